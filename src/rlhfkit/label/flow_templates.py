"""Pages of the labeller flow (:mod:`.flow_web`): the recent-labels list. The skip / flag forms and the edit
mode are part of the label page itself (:data:`.templates.LABEL`)."""

from __future__ import annotations

RECENT = """{% extends "base.html" %}{% block title %}Your recent labels · rlhfkit label{% endblock %}
{% block body %}<section class="card"><h1>Your recent labels</h1>
<p><bdi>{{ project.name }}</bdi> · the last {{ limit }} · <a class="button" href="/label?project={{ project.id }}">back to labelling</a></p>
{% if not labels %}<p id="no-labels">No labels yet.</p>{% endif %}
<ol class="recent" id="recent">{% for lab in labels %}
<li id="recent-{{ lab.label_id }}"><span class="snippet" dir="auto">{{ lab.prompt[:120] }}</span>
{% if lab.edits %}<span class="badge">edited {{ lab.edits }}×</span>{% endif %}
<a class="button edit" href="/label/edit/{{ lab.label_id }}">edit</a></li>{% endfor %}</ol>
</section>{% endblock %}
"""

TEMPLATES = {"recent.html": RECENT}
