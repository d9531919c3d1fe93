"""The reproduction report: a self-contained ``index.html`` (inline CSS, inline PNG figures) and ``results.json``.

``figures`` draws matplotlib figures from the prediction results' ``to_dict()`` data and for the results' ``plot``
methods; ``html`` assembles the page and the results' notebook views (``_repr_html_``).
"""

from .html import render_report

__all__ = ["render_report"]
