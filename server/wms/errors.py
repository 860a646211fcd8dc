"""WMS 1.3.0 exceptions: ``ServiceExceptionReport`` XML with a code and a locator."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..common.errors import ApiProblem

NS_OGC = "http://www.opengis.net/ogc"
_CODE_OF_STATUS = {404: "LayerNotDefined", 405: "OperationNotSupported",
                   501: "OperationNotSupported"}


class WmsError(ApiProblem):
    """A WMS service exception (``code``: e.g. LayerNotDefined, InvalidCRS,
    InvalidDimensionValue; ``locator``: the parameter)."""

    def __init__(self, code: str, message: str, locator: str | None = None,
                 status: int = 400):
        super().__init__(message, locator, status=status)
        self.code = code


def exception_report(problem: ApiProblem) -> bytes:
    code = getattr(problem, "code", None) or _CODE_OF_STATUS.get(problem.status)
    root = ET.Element("ServiceExceptionReport", {"version": "1.3.0", "xmlns": NS_OGC})
    attrs = {}
    if code:
        attrs["code"] = code
    if problem.parameter:
        attrs["locator"] = str(problem.parameter)
    ET.SubElement(root, "ServiceException", attrs).text = problem.message
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True)
