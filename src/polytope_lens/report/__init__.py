"""The reproduction report: a self-contained ``index.html`` (inline CSS, inline PNG figures) and ``results.json``.

``figures`` draws matplotlib figures from the prediction results' ``to_dict()`` data; ``html`` assembles the page.
"""

from .html import render_report

__all__ = ["render_report"]
