"""Tests for campaigns/rendering/: the restricted template engine, the sanitiser, the
layouts, the text part and the context. No database: rendering is pure."""

from __future__ import annotations

import datetime as dt
import itertools
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from django.template import engines
from django.template.loader import render_to_string
from django.utils.safestring import mark_safe

from campaigns.rendering import (
    MAX_LOOP_ITERATIONS,
    MAX_NESTING,
    MAX_SOURCE_CHARS,
    MAX_SUBJECT_CHARS,
    RenderedEmail,
    TemplateRejected,
    build_context,
    render_email,
    validate_template,
)
from campaigns.rendering.layout import render_layout

XSS = "<script>alert(1)</script>"
UNSUBSCRIBE_URL = "https://mail.example.test/u/abc123"


def make_context(
    *, contact: dict | None = None, payload: dict | None = None, links: dict | None = None
) -> dict:
    return build_context(
        contact={"email": "ada@example.test", "first_name": "Ada", **(contact or {})},
        event={"type": "order.placed", "occurred_at": "2024-05-01T10:30:00Z"},
        payload=payload or {},
        links={} if links is None else links,
        sensitive_fields=set(),
        declared_fields=set(),
    )


def render(html: str, *, subject: str = "Hello", text: str = "", **context: Any) -> RenderedEmail:
    return render_email(subject=subject, html=html, text=text, context=make_context(**context))


def body_of(email: RenderedEmail) -> str:
    """The marketer's part of the HTML, without the layout around it."""
    start = email.html.index("color:#18181b;") + len('color:#18181b;">')
    return email.html[start : email.html.index("\n</td>\n</tr>\n</table>", start)].strip()


def rejection(**parts: str) -> list[str]:
    with pytest.raises(TemplateRejected) as caught:
        validate_template(**{"subject": "Hello", "html": "<p>Hi</p>", **parts})
    return caught.value.errors


# --- personalisation -------------------------------------------------------------------


def test_personalisation_uses_contact_fields_with_a_default():
    template = '<p>Hi {{ contact.first_name|default:"there" }}</p>'

    assert body_of(render(template, contact={"first_name": "Grace"})) == "<p>Hi Grace</p>"
    assert body_of(render(template, contact={"first_name": ""})) == "<p>Hi there</p>"


def test_conditionals_compare_payload_values():
    template = '{% if payload.plan == "pro" %}<p>Pro</p>{% elif payload.plan %}<p>Other</p>{% else %}<p>None</p>{% endif %}'

    assert body_of(render(template, payload={"plan": "pro"})) == "<p>Pro</p>"
    assert body_of(render(template, payload={"plan": "free"})) == "<p>Other</p>"
    assert body_of(render(template, payload={})) == "<p>None</p>"


def test_loops_iterate_payload_lists_with_forloop_and_empty():
    template = (
        "<ul>{% for item in payload.items %}<li>{{ forloop.counter }}. {{ item.name }} x{{ item.qty }}</li>"
        "{% empty %}<li>nothing</li>{% endfor %}</ul>"
    )

    full = render(template, payload={"items": [{"name": "Tea", "qty": 2}, {"name": "Cake", "qty": 1}]})
    empty = render(template, payload={"items": []})

    assert body_of(full) == "<ul><li>1. Tea x2</li><li>2. Cake x1</li></ul>"
    assert body_of(empty) == "<ul><li>nothing</li></ul>"


def test_iso_dates_from_the_json_context_format_with_the_date_filter():
    email = render(
        '<p>{{ event.occurred_at|date:"j M Y" }} / {{ payload.day|date:"D" }}</p>',
        payload={"day": "2024-05-03"},
    )

    assert body_of(email) == "<p>1 May 2024 / Fri</p>"


# --- escaping and sanitising ---------------------------------------------------------------


def test_context_data_is_autoescaped_in_the_html_part():
    email = render(
        '<p title="{{ payload.x }}">{{ contact.first_name }}</p>',
        contact={"first_name": XSS},
        payload={"x": '"><b>'},
    )

    assert body_of(email) == '<p title="&quot;&gt;&lt;b&gt;">&lt;script&gt;alert(1)&lt;/script&gt;</p>'
    assert "<script" not in email.html


def test_sanitiser_keeps_tables_safe_inline_styles_and_https_images():
    email = render(
        '<table width="100%" cellpadding="0"><tr><td style="color:#333;padding:8px;position:fixed" align="left">'
        'Cell</td></tr></table><img src="https://cdn.example.test/logo.png" alt="Logo" width="120">'
    )

    assert body_of(email) == (
        '<table width="100%" cellpadding="0"><tbody><tr><td style="color:#333;padding:8px" align="left">Cell</td>'
        '</tr></tbody></table><img src="https://cdn.example.test/logo.png" alt="Logo" width="120">'
    )


def test_sanitiser_removes_scripts_event_handlers_and_dangerous_urls():
    email = render(
        "<script>alert(1)</script><img src=x onerror=alert(1)>"
        '<a href="javascript:alert(1)">js</a><a href="mailto:hi@example.test">mail</a>'
        '<img src="mailto:hi@example.test"><iframe src="https://evil.test"></iframe>'
        '<form action="https://evil.test"><input name="p">Form text</form><style>p{}</style>'
        '<p style="color:red;background-image:url(https://track.test/p.gif)">styled</p>'
    )

    assert body_of(email) == (
        '<img><a rel="noopener noreferrer">js</a><a href="mailto:hi@example.test" rel="noopener noreferrer">mail</a>'
        "<img>Form text<p>styled</p>"
    )


# --- text part -------------------------------------------------------------------------


def test_text_part_is_generated_from_the_html_when_not_given():
    email = render(
        "<h1>Hello &amp; welcome</h1><p>Line one<br>Line two <a href='https://example.test/a'>our site</a></p>"
        "<ul><li>one</li><li>two</li></ul><p>{{ contact.first_name }}</p>",
        contact={"first_name": "<Ada>"},
    )

    assert email.text == (
        "Hello & welcome\n\nLine one\nLine two our site (https://example.test/a)\n\n- one\n- two\n\n<Ada>\n"
    )


def test_text_part_from_tables_images_entities_and_links():
    # The text part is read off nh3's serialisation (campaigns/rendering/text.py): the
    # escaped quotes, '>' and '&' in attribute values and text must come out as text.
    email = render(
        '<table><tr><td nowrap>Plan</td><td title="a>b &quot;c&quot;">Pro &amp; more</td></tr></table>'
        '<img src="https://i.example.test/l.png" alt="Acme &quot;Co&quot; &amp; sons">'
        '<img src="https://i.example.test/s.png" alt="">'
        '<p>A&nbsp;B &lt;tag&gt; <a href="https://example.test/?a=1&amp;b=2">the offer</a> '
        '<a href="https://example.test/x">https://example.test/x</a> '
        '<a href="mailto:help@example.test">help@example.test</a> '
        '<a href="javascript:alert(1)">bad link</a><script>alert(1)</script></p>'
        "<ol><li>one<ul><li>nested</li></ul></li></ol><div>line</div><center>mid</center><hr>"
        "<pre>  keep\n  lines</pre><p>{{ contact.first_name }}</p>",
        contact={"first_name": 'Zoë "Z" <z@example.test>'},
    )

    assert email.text == (
        'Plan Pro & more\n\nAcme "Co" & sons\n\n'
        "A B <tag> the offer (https://example.test/?a=1&b=2) https://example.test/x help@example.test bad link"
        "\n\n- one\n\n- nested\n\nline\n\nmid\n\nkeep lines\n\n"
        'Zoë "Z" <z@example.test>\n'
    )


def test_text_part_is_rendered_from_its_own_template_without_escaping():
    email = render(
        "<p>HTML version</p>",
        text="Hi {{ contact.first_name }} & co\n\nPlain version",
        contact={"first_name": "<b>Al</b>"},
    )

    assert email.text == "Hi <b>Al</b> & co\n\nPlain version\n"


# --- layout ----------------------------------------------------------------------------


def test_layout_wraps_the_body_and_shows_the_unsubscribe_link():
    email = render("<p>Body</p>", subject="Welcome", links={"unsubscribe_url": UNSUBSCRIBE_URL})

    assert email.html.startswith("<!DOCTYPE html>")
    assert "<title>Welcome</title>" in email.html
    assert body_of(email) == "<p>Body</p>"
    assert f'<a href="{UNSUBSCRIBE_URL}" style="color:#71717a;">Unsubscribe</a>' in email.html
    assert email.text.endswith(f"--\nUnsubscribe: {UNSUBSCRIBE_URL}\n")


def test_layout_shows_no_unsubscribe_link_without_an_http_url():
    without = render("<p>Body</p>", links={})
    not_http = render("<p>Body</p>", links={"unsubscribe_url": "javascript:alert(1)"})

    for email in (without, not_http):
        assert "Unsubscribe" not in email.html
        assert "Unsubscribe" not in email.text
        assert "javascript:" not in email.html


def test_subject_is_one_line_without_control_characters_and_capped():
    email = render(
        "<p>x</p>",
        subject="Hi\n  {{ contact.first_name }}!",
        contact={"first_name": "Ada\r\nBcc: x@evil.test\x00"},
    )
    long = render("<p>x</p>", subject="{{ contact.first_name }}", contact={"first_name": "y" * 5000})

    assert email.subject == "Hi Ada Bcc: x@evil.test !"
    assert len(long.subject) == MAX_SUBJECT_CHARS


LAYOUT_LINK_VALUES = {
    "unsubscribe_url": "https://mail.example.test/u/a&b\"<'>",
    "preferences_url": "https://mail.example.test/p/abc",
    "view_in_browser_url": "http://view.example.test/?a=1&b=2",
}


@pytest.mark.parametrize("name", ["email/layout.html", "email/layout.txt"])
def test_layout_filled_in_per_shape_is_what_django_renders(name: str):
    # The layouts are rendered once per shape (which values are set) and filled in;
    # every shape, with values that need escaping, must match Django's own render.
    for count in range(len(LAYOUT_LINK_VALUES) + 1):
        for names in itertools.combinations(LAYOUT_LINK_VALUES, count):
            for subject in ("Tom & Jerry <b>'\"", ""):
                for body in (mark_safe("<p>a &amp; b</p>"), "x < y & \x00mailauto-layout-slot-0&\x00", ""):
                    context = {
                        "subject": subject,
                        "links": {link: LAYOUT_LINK_VALUES[link] for link in names},
                        "body": body,
                    }
                    assert render_layout(name, context) == render_to_string(name, context), context


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{% if subject == 'Hi' %}greeting: {% endif %}{{ subject }}|{{ body }}", "greeting: Hi|b"),
        ("{{ subject|upper }}|{{ body|length }}", "HI|1"),
        ("{% with s=subject %}{{ s }}{% endwith %}|{{ body }}", "Hi|b"),
    ],
)
def test_a_layout_that_does_more_than_print_and_test_values_is_rendered_by_django(
    source: str, expected: str, tmp_path, settings
):
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "layout.html").write_text(source)
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path], "APP_DIRS": False}]

    for subject in ("Hi", "Bye & <go>", "Hi"):
        context = {"subject": subject, "links": {}, "body": "b"}
        assert render_layout("email/layout.html", context) == render_to_string("email/layout.html", context)
    assert render_layout("email/layout.html", {"subject": "Hi", "links": {}, "body": "b"}) == expected


def test_an_edited_layout_is_not_served_from_the_shapes_of_the_old_one(tmp_path, settings):
    layout = tmp_path / "email" / "layout.html"
    layout.parent.mkdir()
    layout.write_text("old: {{ subject }}")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path], "APP_DIRS": False}]
    context = {"subject": "Hi", "links": {}, "body": "b"}
    assert render_layout("email/layout.html", context) == "old: Hi"

    layout.write_text("new: {{ subject }}")
    for loader in engines["django"].engine.template_loaders:  # what the autoreloader does
        loader.reset()

    assert render_layout("email/layout.html", context) == "new: Hi"


# --- validation ------------------------------------------------------------------------


def test_validation_errors_name_the_part_and_the_line():
    assert rejection(html="<p>\n\n{{ payload.x|safe }}</p>") == [
        "html, line 3: the filter 'safe' is not allowed"
    ]
    assert rejection(html="{% load log %}") == ["html, line 1: the tag 'load' is not allowed"]
    assert rejection(subject="{% if payload.x %}Hi") == ["subject, line 1: unclosed tag 'if'"]
    assert rejection(text="ok\n{% endif %}") == ["text, line 2: unexpected tag 'endif'"]


def test_all_problems_of_all_parts_are_reported_together():
    errors = rejection(
        subject="{{ payload.x|pprint }}", html="{% debug %}\n{% autoescape off %}{% endautoescape %}"
    )

    assert errors == [
        "subject, line 1: the filter 'pprint' is not allowed",
        "html, line 1: the tag 'debug' is not allowed",
        "html, line 2: the tag 'autoescape' is not allowed",
    ]
    with pytest.raises(TemplateRejected, match="; html, line 1: the tag 'debug'"):
        validate_template(subject="{{ payload.x|pprint }}", html="{% debug %}")


def test_unknown_root_variable_is_rejected():
    errors = rejection(html="<p>{{ contact.first_name }}</p>\n<p>{{ settings.SECRET_KEY }}</p>")

    assert errors == [
        "html, line 2: unknown variable 'settings.SECRET_KEY' (templates can use contact, event, payload, links)"
    ]


def test_variables_and_attributes_starting_with_underscore_are_rejected():
    errors = rejection(html="{{ payload.__class__ }}")

    assert errors == [
        "html, line 1: Variables and attributes may not begin with underscores: 'payload.__class__'"
    ]


def test_translation_syntax_is_rejected():
    assert rejection(html='{{ _("Hi") }}') == ["html, line 1: translated strings _(...) are not allowed"]


def test_loop_variables_exist_only_inside_their_loop():
    errors = rejection(html="{% for item in payload.items %}{{ item.name }}{% endfor %}\n{{ item.name }}")

    assert errors == [
        "html, line 2: unknown variable 'item.name' (templates can use contact, event, payload, links)"
    ]


def test_validate_returns_the_data_paths_with_aliases_expanded():
    paths = validate_template(
        subject="{{ contact.first_name }}",
        html=(
            '{% if payload.plan == "pro" %}{% for item in payload.items %}{{ forloop.counter }}{{ item.name }}'
            "{% endfor %}{% endif %}{% with address=payload.address %}{{ address.city }}{% endwith %}"
            '{{ payload.lines.0.sku }}<a href="{{ links.unsubscribe_url }}">u</a>'
        ),
        text="{{ event.type }}",
    )

    assert paths == {
        "contact.first_name",
        "payload.plan",
        "payload.items",
        "payload.items.name",
        "payload.address",
        "payload.address.city",
        "payload.lines.sku",
        "links.unsubscribe_url",
        "event.type",
    }


def test_empty_subject_is_rejected():
    assert rejection(subject="  \n ") == ["subject, line 1: the subject is empty"]


def test_oversized_template_is_rejected():
    errors = rejection(html="x" * (MAX_SOURCE_CHARS + 1))

    assert errors == [f"html, line 1: the template is longer than {MAX_SOURCE_CHARS:,} characters"]


def test_deep_nesting_is_rejected_before_parsing():
    depth = MAX_NESTING + 1
    errors = rejection(html="{% if payload.x %}\n" * depth + "{% endif %}" * depth)

    assert errors == [f"html, line {depth}: tags are nested more than {MAX_NESTING} deep"]


# --- what templates cannot reach or do -----------------------------------------------------


def test_methods_and_attributes_of_data_are_not_callable():
    payload = {"tags": ["a", "b"], "count": 7, "nested": {"k": "v"}}
    email = render(
        "<p>[{{ payload.items }}][{{ contact.keys }}][{{ contact.email.upper }}][{{ payload.tags.pop }}]"
        "[{{ payload.count.bit_length }}][{{ payload.nested.values }}][{{ contact.email.format }}]"
        "[{{ payload.tags.1 }}]</p>",
        payload=payload,
    )

    assert body_of(email) == "<p>[][][][][][][][b]</p>"
    assert payload["tags"] == ["a", "b"]


def test_dict_keys_named_like_methods_still_resolve():
    email = render("<p>{{ payload.items }}/{{ payload.keys.0 }}</p>", payload={"items": "yes", "keys": ["k"]})

    assert body_of(email) == "<p>yes/k</p>"


def test_runaway_loops_are_stopped_with_a_rejection():
    size = 30  # 30**3 > MAX_LOOP_ITERATIONS
    assert size**3 > MAX_LOOP_ITERATIONS
    template = "<p>\n{% for a in payload.l %}{% for b in payload.l %}{% for c in payload.l %}.{% endfor %}{% endfor %}{% endfor %}</p>"

    with pytest.raises(TemplateRejected) as caught:
        render(template, payload={"l": list(range(size))})

    assert caught.value.errors == [
        f"html, line 2: the template is too expensive to render: more than {MAX_LOOP_ITERATIONS:,} loop iterations"
    ]


def test_output_size_is_bounded():
    template = "{% with a=payload.x|ljust:1000 %}" + "{{ a }}" * 2000 + "{% endwith %}"

    with pytest.raises(TemplateRejected, match="more than 1,000,000 characters of output"):
        render(template, payload={"x": "y"})


def test_filters_with_huge_arguments_render_empty():
    email = render(
        "<p>[{{ payload.x|center:999999999 }}][{{ 1.5|floatformat:999999 }}][{{ payload.x|center:5 }}]"
        "[{{ 1.25|floatformat:1 }}][{{ payload.d|first }}]</p>",
        payload={"x": "y", "d": {"k": 1}},
    )

    assert body_of(email) == "<p>[][][  y  ][1.3][]</p>"


# --- context ---------------------------------------------------------------------------


def test_sensitive_payload_field_is_removed_unless_declared():
    payload = {"card_last4": "4242", "address": {"street": "1 Main St", "city": "Leeds"}, "plan": "pro"}

    hidden = build_context(
        contact={},
        event={},
        payload=payload,
        links={},
        sensitive_fields={"card_last4", "address.street"},
        declared_fields=set(),
    )
    declared = build_context(
        contact={},
        event={},
        payload=payload,
        links={},
        sensitive_fields={"card_last4", "address.street"},
        declared_fields={"card_last4"},
    )

    assert hidden["payload"] == {"address": {"city": "Leeds"}, "plan": "pro"}
    assert declared["payload"] == {"card_last4": "4242", "address": {"city": "Leeds"}, "plan": "pro"}
    assert payload["address"] == {"street": "1 Main St", "city": "Leeds"}  # the caller's data is untouched


def test_declaring_an_object_keeps_the_sensitive_fields_inside_it():
    context = build_context(
        contact={},
        event={},
        payload={"address": {"street": "1 Main St", "city": "Leeds"}},
        links={},
        sensitive_fields={"address.street"},
        declared_fields={"address"},
    )

    assert context["payload"] == {"address": {"street": "1 Main St", "city": "Leeds"}}


def test_sensitive_fields_inside_lists_and_odd_shapes_are_withheld():
    context = build_context(
        contact={},
        event={},
        payload={
            "cards": [{"number": "4242", "brand": "visa"}],
            "tags": ["vip"],
            "address": "1 Main St, Leeds",
        },
        links={},
        sensitive_fields={"cards.*.number", "tags.*", "address.street"},
        declared_fields=set(),
    )

    # address was declared an object holding a sensitive street: as a string it may hold it too.
    assert context["payload"] == {"cards": [{"brand": "visa"}]}


def test_context_is_forced_to_plain_json():
    context = build_context(
        contact={"joined": dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.UTC), "tags": ("a", "b")},
        event={"id": 1},
        payload={"amount": 5},
        links={"unsubscribe_url": UNSUBSCRIBE_URL},
        sensitive_fields=set(),
        declared_fields=set(),
    )

    assert context == {
        "contact": {"joined": "2024-05-01T10:30:00Z", "tags": ["a", "b"]},
        "event": {"id": 1},
        "payload": {"amount": 5},
        "links": {"unsubscribe_url": UNSUBSCRIBE_URL},
    }
    with pytest.raises(TypeError):
        build_context(
            contact={"x": object()},
            event={},
            payload={},
            links={},
            sensitive_fields=set(),
            declared_fields=set(),
        )


def test_marked_safe_strings_in_the_context_are_escaped_like_any_other_data():
    # A str subclass such as SafeString must not survive into the context: it would
    # skip autoescaping.
    email = render(
        "<p>{{ contact.first_name }} {{ payload.items.0 }}</p>",
        contact={"first_name": mark_safe(XSS)},
        payload={"items": [mark_safe('<img src=x onerror="alert(1)">')]},
    )

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body_of(email)
    assert '&lt;img src=x onerror="alert(1)"&gt;' in body_of(email)
    assert "<script" not in email.html
    assert "<img" not in body_of(email)


def test_plain_json_copies_instead_of_sharing_the_callers_data():
    payload = {"items": [{"name": "a"}]}
    context = build_context(
        contact={}, event={}, payload=payload, links={}, sensitive_fields=set(), declared_fields=set()
    )
    context["payload"]["items"][0]["name"] = "changed"

    assert payload == {"items": [{"name": "a"}]}


def test_plain_json_turns_non_string_keys_into_strings_as_json_does():
    context = build_context(
        contact={1: "one", "2": "two"},
        event={"nested": {"when": dt.date(2024, 5, 1)}},
        payload={},
        links={},
        sensitive_fields=set(),
        declared_fields=set(),
    )

    assert context["contact"] == {"1": "one", "2": "two"}
    assert context["event"] == {"nested": {"when": "2024-05-01"}}


def test_styles_with_a_red_flag_in_any_case_are_dropped_whole():
    email = render(
        '<p style="color:red;width:EXPRESSION(alert(1))">a</p><p style="COLOR:red;Background:URL(x)">b</p>'
        '<p style="color:red">c</p><img src="mailto:a@b.test" alt="i"><a href="MAILTO:a@b.test">m</a>'
    )

    assert body_of(email) == (
        '<p>a</p><p>b</p><p style="color:red">c</p><img alt="i">'
        '<a href="MAILTO:a@b.test" rel="noopener noreferrer">m</a>'
    )


# --- SSTI corpus -----------------------------------------------------------------------

CORPUS_FILE = Path(__file__).with_name("ssti_payloads.txt")
CORPUS = [line for line in CORPUS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
GENERATED = {
    "deep for nesting": "{% for a in payload.tags %}" * 50 + "x" + "{% endfor %}" * 50,
    "deep if nesting": "{% if payload.x %}" * 1000 + "{% endif %}" * 1000,
    "not chain": "{% if " + "not " * 5000 + "payload.x %}x{% endif %}",
    "loop over a long literal": '{% for c in "'
    + "a" * 50_000
    + '" %}{% for d in payload.tags %}{% endfor %}{% endfor %}',
    "nested loops": "{% for a in payload.wide %}{% for b in payload.wide %}{% for c in payload.wide %}{{ c }}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "filter chain": "{{ payload.x" + '|urlencode:""' * 200 + " }}",
    "oversized": "x" * (MAX_SOURCE_CHARS + 1),
    "multi-line load": "Hello\n\n{% load log %}\n{% get_admin_log 10 as log %}",
}
SENTINEL_SECRET = "sentinel-secret-key-9f3c2a"
# Never in any part: secrets, settings, Python reprs, file contents, tokens.
LEAK_MARKERS = (
    SENTINEL_SECRET,
    "<class",
    "<bound method",
    "<built-in",
    "<function",
    "<module",
    " object at 0x",
    "Budgeted",
    "django.",
    "root:x:0:0",
    "csrfmiddlewaretoken",
    "dict_items",
    "dict_keys",
    "dict_values",
    "Traceback",
)


class ActiveHtmlFinder(HTMLParser):
    """Elements and attributes in the final HTML that a mail client could act on.
    Structural, so that a subject's escaped "&lt;a href=javascript:..." in <title> (inert
    text) is not mistaken for a link."""

    DANGEROUS_TAGS = frozenset(
        {
            "script",
            "iframe",
            "frame",
            "object",
            "embed",
            "applet",
            "form",
            "input",
            "style",
            "svg",
            "math",
            "base",
            "link",
        }
    )
    URL_ATTRIBUTES = frozenset({"href", "src", "action", "formaction", "background", "xlink:href", "poster"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.DANGEROUS_TAGS or (tag == "meta" and "http-equiv" in dict(attrs)):
            self.found.append(f"<{tag}>")
        for name, value in attrs:
            lowered = (value or "").strip().lower()
            if name.startswith("on"):
                self.found.append(f"{tag} {name}")
            elif name in self.URL_ATTRIBUTES and not lowered.startswith(("https://", "http://", "mailto:")):
                self.found.append(f"{tag} {name}={value}")
            elif name == "style" and any(
                bad in lowered for bad in ("url(", "expression(", "position", "javascript")
            ):
                self.found.append(f"{tag} style={value}")


def active_html(html: str) -> list[str]:
    finder = ActiveHtmlFinder()
    finder.feed(html)
    finder.close()
    return finder.found


def corpus_context() -> dict:
    context = make_context(
        contact={"first_name": XSS},
        payload={
            "x": XSS,
            "js_url": "javascript:alert(1)",
            "tags": ["a", "b"],
            "products": [{"name": "Tea"}, {"name": "Cake"}],
            "count": 3,
            "wide": list(range(30)),
        },
        links={"unsubscribe_url": UNSUBSCRIBE_URL},
    )
    # A root templates must not reach, holding a secret: it must not come out.
    return {**context, "settings": {"SECRET_KEY": SENTINEL_SECRET}}


def test_corpus_checker_detects_active_html():
    assert active_html('<a href="javascript:alert(1)">x</a>') == ["a href=javascript:alert(1)"]
    assert active_html("<img src=x onerror=alert(1)>") == ["img src=x", "img onerror"]
    assert active_html('<p style="background:url(x)"><script></script>') == [
        "p style=background:url(x)",
        "<script>",
    ]
    assert active_html('<title>&lt;a href="javascript:x"&gt;</title><a href="https://ok.test">ok</a>') == []


def test_corpus_has_at_least_40_payloads():
    assert len(CORPUS) >= 40
    assert len(set(CORPUS)) == len(CORPUS)


@pytest.mark.parametrize("part", ["subject", "html", "text"])
@pytest.mark.parametrize("payload", CORPUS + list(GENERATED.values()), ids=[*CORPUS, *GENERATED])
def test_ssti_payload_is_rejected_or_renders_harmlessly(payload: str, part: str, settings):
    settings.SECRET_KEY = SENTINEL_SECRET
    parts = {"subject": "Hello", "html": "<p>Hello</p>", "text": "", part: payload}
    try:
        validate_template(**parts)
        email = render_email(**parts, context=corpus_context())
    except TemplateRejected as rejected:
        assert rejected.errors
        assert all(error.startswith(f"{part}, line ") for error in rejected.errors), rejected.errors
        return
    for output in (email.subject, email.html, email.text):
        leaked = [marker for marker in LEAK_MARKERS if marker in output]
        assert not leaked, (leaked, output)
    assert not active_html(email.html), (active_html(email.html), email.html)
    assert "<script" not in email.html.lower()  # not even as a broken tag
    assert "\n" not in email.subject
