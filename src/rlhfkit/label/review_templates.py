"""Reviewer pages (Jinja2, the app's environment: autoescape, bidi controls shown as markers, user text in
``<bdi>`` / ``dir="auto"`` isolates). Registered into the app's DictLoader by :mod:`.review_web`."""

from __future__ import annotations

PROGRESS_BLOCK = """<section class="card" id="progress"><h2>Progress</h2>
<p id="progress-summary">{{ progress["items"] }} items · <b id="items-done">{{ progress.done }}</b> done ·
<b id="items-in-progress">{{ progress.in_progress }}</b> in progress · <b id="items-left">{{ progress.left }}</b> left ·
{{ progress.labels_last_24h }} labels in the last 24 h ({{ "%.2f"|format(progress.labels_per_hour) }} per hour)</p>
<p class="note" id="labels-by-hour">Labels per hour, oldest first: {{ progress.labels_by_hour|join(' · ') }}</p>
<div class="scroll"><table id="progress-labellers"><tr><th>labeller</th><th>done</th><th>in progress</th><th>left</th>
<th>labels / hour (24 h)</th></tr>
{% for name, r in progress.labellers.items() %}<tr><td><bdi>{{ name }}</bdi></td><td>{{ r.done }}</td>
<td>{{ r.in_progress }}</td><td>{{ r.left }}</td><td>{{ "%.2f"|format(r.labels_per_hour) }}</td></tr>{% endfor %}
</table></div></section>"""

REVIEW_INDEX = """{% extends "base.html" %}{% block title %}Review · rlhfkit label{% endblock %}{% block body %}
<section class="card"><h1>Review</h1>
{% if not projects %}<p>No projects yet.</p>{% endif %}
<ul class="projects">{% for p in projects %}
<li><a href="/review/{{ p.id }}"><bdi>{{ p.name }}</bdi></a> · {{ p.tasks|join(', ') }} ·
<a href="/review/{{ p.id }}/progress">progress</a></li>{% endfor %}</ul></section>
{% endblock %}
"""

REVIEW_PROGRESS = """{% extends "base.html" %}{% block title %}Progress · rlhfkit label{% endblock %}{% block body %}
<p><a href="/review/{{ project.id }}">← review of <bdi>{{ project.name }}</bdi></a></p>
""" + PROGRESS_BLOCK + """
{% endblock %}
"""

REVIEW = """{% extends "base.html" %}{% block title %}Review {{ project.name }} · rlhfkit label{% endblock %}
{% block body %}
<section class="card"><h1>Review: <bdi>{{ project.name }}</bdi></h1>
<p>{{ items|length }} items shown{% if only_disputed %} (disagreements only){% endif %} · {{ disputed }} with
disagreement · tasks: {{ project.tasks|join(', ') }} ·
<a href="/review/{{ project.id }}?disputed={{ 0 if only_disputed else 1 }}{% if fast_override is not none %}&amp;fast={{ thresholds.fast_seconds }}{% endif %}">
{{ 'show all items' if only_disputed else 'disagreements only' }}</a> ·
<a class="button" id="review-export" href="/review/{{ project.id }}/export.jsonl?kind=pairs">export pairs (adjudicated + majority)</a></p>
{% if error %}<p class="error" role="alert" id="error">{{ error }}</p>{% endif %}
</section>
""" + PROGRESS_BLOCK + """
<section class="card" id="quality"><h2>Labellers</h2>
<p id="fast-threshold">Very fast: a label submitted in under {{ '%g'|format(thresholds.fast_seconds) }} s
({% if fast_override is not none %}this view's <code>?fast=</code>; the project's setting is on the admin
page{% else %}the project's setting, on the admin page; <code>?fast=SECONDS</code> overrides it for one
view{% endif %}).</p>
<div class="scroll"><table id="quality-table"><tr><th>labeller</th><th>labels</th><th>median s / label</th>
<th>agreement with others (pairs)</th><th>agreement with adjudications (ratings)</th><th>very fast</th>
<th>skipped</th></tr>
{% for name, q in quality.items() %}<tr class="{{ 'flagged' if q.very_fast else '' }}" data-labeller="{{ name }}">
<td><bdi>{{ name }}</bdi></td><td class="q-labels">{{ q.labels }}</td>
<td class="q-median">{{ fmt(q.median_seconds) }}</td>
<td class="q-others">{{ fmt(q.agreement_with_others) }} ({{ q.pairs_compared }})</td>
<td class="q-adj">{{ fmt(q.agreement_with_adjudications) }} ({{ q.adjudicated_ratings }})</td>
<td class="q-fast">{{ q.very_fast }}</td><td class="q-skipped">{{ q.skipped }}</td></tr>{% endfor %}</table></div></section>
{% for it in items %}
<section class="card review-item{{ ' disputed' if it.disputed else '' }}" id="item-{{ it.item_id }}">
<h3>Item {{ it.item_id }}{% if it.disputed %} <span class="badge disagree">disagreement:
{% for k in ('pairwise', 'binary', 'ranking_top') if it.disagreement[k] %}{{ k }} {% endfor %}
{%- if it.disagreement.likert_spread is not none %}likert spread {{ it.disagreement.likert_spread }}{% endif %}</span>{% endif %}
{% if it.gold is not none %} <span class="badge">gold: R{{ it.gold + 1 }}</span>{% endif %}</h3>
{% for f in it.flags %}<p class="error item-flag" data-reason="{{ f.reason }}">Flagged: {{ f.reason_text }} by
<bdi>{{ f.labeller }}</bdi> ({{ f.at }}){% if f.note %} — <span dir="auto">{{ f.note }}</span>{% endif %}</p>{% endfor %}
{% if it.skips %}<p class="note item-skips">Skipped by {{ it.skips|length }}: {% for k in it.skips %}<bdi>{{ k.labeller }}</bdi>
({{ k.reason_text }}{% if k.note %}: <span dir="auto">{{ k.note }}</span>{% endif %}){{ ', ' if not loop.last else '' }}{% endfor %}</p>{% endif %}
<div class="text" dir="auto">{{ it.prompt }}</div>
<ol class="review-responses">{% for r in it.responses %}<li><b>R{{ loop.index }}</b> <span class="text" dir="auto">{{ r }}</span></li>{% endfor %}</ol>
<table class="labels"><tr><th>labeller</th>{% for t in project.tasks %}<th>{{ t }}</th>{% endfor %}<th>seconds</th></tr>
{% for lab in it.labels %}<tr><td><bdi>{{ lab.coder }}</bdi></td>{% for t in project.tasks %}
<td dir="auto">{{ describe(t, lab.answers.get(t)) }}</td>{% endfor %}
<td>{{ fmt(lab.duration_ms / 1000) if lab.duration_ms is not none else '–' }}</td></tr>
{% else %}<tr><td colspan="{{ project.tasks|length + 2 }}">no labels yet</td></tr>{% endfor %}</table>
{% for t, adj in it.adjudications.items() %}<p class="notice final" data-task="{{ t }}">Final {{ t }}:
<b>{{ describe(t, adj.answer) }}</b> by <bdi>{{ adj.reviewer }}</bdi> ({{ adj.created_at }}){% if adj.note %} —
<span dir="auto">{{ adj.note }}</span>{% endif %}</p>{% endfor %}
{% for old in history.get(it.item_id, []) %}<p class="note superseded">earlier {{ old.task }}: {{ describe(old.task, old.answer) }}
by <bdi>{{ old.reviewer }}</bdi> ({{ old.created_at }}, replaced {{ old.superseded_at }})</p>{% endfor %}
{% for t, opts in options[it.item_id].items() %}
<form method="post" action="/review/{{ project.id }}/items/{{ it.item_id }}/adjudicate" class="row adjudicate" data-task="{{ t }}">
<input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="task" value="{{ t }}">
<label>Final {{ t }} <select name="answer">{% for value, text in opts %}<option value="{{ value }}">{{ text }}</option>{% endfor %}</select></label>
<label>note <input name="note" maxlength="5000"></label>
<button type="submit">adjudicate {{ t }}</button></form>{% endfor %}
</section>{% else %}<section class="card"><p>No items to show.</p></section>{% endfor %}
{% endblock %}
"""

TEMPLATES = {"review_index.html": REVIEW_INDEX, "review.html": REVIEW, "review_progress.html": REVIEW_PROGRESS}
