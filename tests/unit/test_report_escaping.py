"""Names from records are text, never markup: a model called <script>...</script> is shown as such."""

import json
from html.parser import HTMLParser

from memtune.report import write_index
from memtune.reporting import plan_report
from tests.conftest import ASSETS

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def evil_plan_result() -> dict:
    """The recorded Llama Guard plan, with hostile names wherever a record carries free text."""
    result = json.loads((ASSETS / "report" / "plan.json").read_text())
    result["estimate"]["model"] = EVIL
    result["candidates"][1]["label"] = EVIL + " + checkpointing"
    result["candidates"][1]["reason"] = 'needs <b onclick="x()">more</b> & "quotes"'
    result["data"]["source"] = "</code><script>steal()</script>"
    return result


class _Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.title, self._in_title = [], "", False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, text):
        if self._in_title:
            self.title += text


def test_a_model_named_script_is_shown_as_text(tmp_path):
    page = plan_report(evil_plan_result(), tmp_path / "evil.html").read_text()
    assert EVIL not in page and "<script>steal()" not in page and "<b onclick" not in page
    parsed = _Parsed()
    parsed.feed(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert parsed.title == f"{EVIL} on L4-24GB: plan report"  # the browser shows the name itself
    assert f"<h1>{ESCAPED} on L4-24GB: plan report</h1>" in page
    assert f'<meta name="memtune:model" content="{ESCAPED}">' in page
    assert "needs &lt;b onclick=&#34;x()&#34;&gt;more&lt;/b&gt; &amp; &#34;quotes&#34;" in page
    # matplotlib escapes the names it draws in the SVG (the chart's title and the candidate's bar)
    svg = page[page.index("<svg "):page.index("</svg>")]
    assert svg.count(ESCAPED) == 2 and "<script" not in svg


def test_the_index_escapes_names_too(tmp_path):
    plan_report(evil_plan_result(), tmp_path / "evil.html")
    page = write_index(tmp_path).read_text()
    parsed = _Parsed()
    parsed.feed(page)
    assert "script" not in parsed.tags and EVIL not in page
    assert f"<td>{ESCAPED}</td>" in page
