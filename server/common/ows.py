"""The OGC OWS 1.1 error envelope: ``ExceptionReport`` XML (WMTS; any OWS 1.1 service).

:class:`OwsError` is an :class:`~server.common.errors.ApiProblem` with an OWS
``exceptionCode`` and a ``locator`` (the parameter); :func:`exception_report` writes any
problem as an ``ExceptionReport``, choosing the code from the status for problems that
carry none.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from .errors import ApiProblem

NS_OWS = "http://www.opengis.net/ows/1.1"

_CODE_OF_STATUS = {400: "InvalidParameterValue", 404: "InvalidParameterValue",
                   405: "OperationNotSupported", 501: "OperationNotSupported"}


class OwsError(ApiProblem):
    """An OWS exception: ``code`` (exceptionCode), ``locator`` (the parameter), status."""

    def __init__(self, code: str, message: str, locator: str | None = None,
                 status: int = 400):
        super().__init__(message, locator, status=status)
        self.code = code

    @property
    def locator(self) -> str | None:
        return self.parameter


def invalid(locator: str, message: str) -> OwsError:
    return OwsError("InvalidParameterValue", message, locator)


def missing(locator: str) -> OwsError:
    return OwsError("MissingParameterValue", f"parameter {locator} is required", locator)


def exception_report(problem: ApiProblem) -> bytes:
    """The ``ows:ExceptionReport`` document of a problem."""
    code = getattr(problem, "code", None) or _CODE_OF_STATUS.get(problem.status,
                                                                 "NoApplicableCode")
    # literal prefixes: ElementTree's global prefix registry is shared by every module
    root = ET.Element("ows:ExceptionReport",
                      {"xmlns:ows": NS_OWS, "version": "1.1.0", "xml:lang": "en"})
    attrs = {"exceptionCode": code}
    if problem.parameter:
        attrs["locator"] = str(problem.parameter)
    exc = ET.SubElement(root, "ows:Exception", attrs)
    ET.SubElement(exc, "ows:ExceptionText").text = problem.message
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
