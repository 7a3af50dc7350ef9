"""The sections (sections.py) written out: Markdown, and HTML through the one jinja2 template
(pipeline/templates/report.html.j2). Neither is parsed back from the other."""

from __future__ import annotations


def render_markdown(run: str, sections: list[dict]) -> str:
    md = [f"# clipcurate run report: {run}", ""]
    for s in sections:
        md += ["#" * s["level"] + " " + s["title"], ""]
        if s["text"]:
            md += [s["text"], ""]
        for t in s["tables"]:
            if t.title:
                md += ["#" * (s["level"] + 1) + " " + t.title, ""]
            md += [t.markdown(), ""]
        md += [f"- {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
        md += [f"![{title}]({src})" for title, src in s["figures"]] + ([""] if s["figures"] else [])
        if s["pre"]:
            md += [s["pre"], ""]
        if s["cards"]:
            md += [f"- {'(no image) ' if not c['thumb'] else ''}{c['text']}" for c in s["cards"]] + [""]
    return "\n".join(md)


def render_html(run: str, sections: list[dict]) -> str:
    import jinja2  # on first use: a stage's report hook imports Table, not the template engine

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(run=run, sections=sections)
