"""Server-rendered pages (Jinja2, autoescape on), one small vanilla script and a stylesheet: no CDN, no build.

Kept as strings so they ship inside the wheel without package-data configuration. User text sits in bidi
isolates (``dir="auto"`` / ``<bdi>``, CSS ``unicode-bidi: isolate``) and the environment's ``finalize``
(web.py) shows bidi controls as visible ``[U+202E]`` markers, so right-to-left overrides stay inert.
"""

from __future__ import annotations

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}rlhfkit label{% endblock %}</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head><body>
<header><strong>rlhfkit label</strong>
{% if user %}<span class="who"><bdi>{{ user.name }}</bdi> ({{ user.role }})</span>
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" class="link">log out</button></form>{% endif %}
</header>
<main>{% block body %}{% endblock %}</main>
</body></html>
"""

LOGIN = """{% extends "base.html" %}{% block title %}Log in · rlhfkit label{% endblock %}{% block body %}
<section class="card narrow"><h1>Log in</h1>
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{{ login_csrf }}">
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit" id="login">Log in</button>
</form></section>
{% endblock %}
"""

PROJECTS = """{% extends "base.html" %}{% block body %}
<section class="card"><h1>Projects</h1>
{% if not projects %}<p>No projects yet.</p>{% endif %}
<ul class="projects">{% for p in projects %}
<li><a href="/label?project={{ p.id }}"><bdi>{{ p.name }}</bdi></a> · {{ p.done }} done · {{ p.remaining }} remaining</li>
{% endfor %}</ul></section>
{% endblock %}
"""

LABEL = """{% extends "base.html" %}{% block title %}{{ project.name }} · rlhfkit label{% endblock %}
{% block body %}{% set pre = pre or {} %}
<div class="layout">
<aside class="guidelines card" id="guidelines"><details id="guidelines-details"{{ ' open' if first else '' }}><summary>Guidelines</summary>
<div class="md" dir="auto">{{ guidelines_html | safe }}</div></details>
<details><summary>Keyboard shortcuts</summary><ul class="keys">
<li><kbd>j</kbd>/<kbd>k</kbd> next / previous response</li>
{% if 'pairwise' in project.tasks %}<li><kbd>a</kbd> A better · <kbd>b</kbd> B better · <kbd>t</kbd> tie ·
<kbd>s</kbd> strength 1→2→3</li>{% endif %}
{% if 'ranking' in project.tasks %}<li><kbd>u</kbd>/<kbd>d</kbd> move the current response up / down the ranking</li>{% endif %}
{% if 'binary' in project.tasks %}<li><kbd>y</kbd> accept · <kbd>n</kbd> reject the current response</li>{% endif %}
{% if 'likert' in project.tasks %}<li><kbd>1</kbd>–<kbd>5</kbd> rate the current response</li>{% endif %}
{% if 'critique' in project.tasks %}<li><kbd>c</kbd> write a critique · <kbd>r</kbd> write a rewrite · <kbd>Esc</kbd> leave the text box</li>{% endif %}
<li><kbd>Enter</kbd> submit (<kbd>Ctrl</kbd>+<kbd>Enter</kbd> inside a text box)</li>
</ul></details></aside>
<section class="work">
<p class="progress" id="progress"><bdi>{{ project.name }}</bdi> · <b id="done">{{ progress.done }}</b> done ·
<b id="remaining">{{ progress.remaining }}</b> remaining ·
<a href="/label/recent?project={{ project.id }}" id="recent-link">your recent labels</a></p>
{% if editing %}<p class="notice" id="editing">Editing your label of this item: submitting replaces it (the old
answer is kept in the history).</p>{% endif %}
{% if error %}<p class="error" role="alert" id="error">{{ error }}</p>{% endif %}
{% if not view %}
<div class="card"><h2>All done</h2><p>Nothing left for you in this project. Thank you!</p></div>
{% else %}
<form method="post" action="{{ editing.action if editing else '/label/' ~ view.assignment_id }}" id="label-form" data-k="{{ view.responses|length }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="idempotency_key" value="{{ idem_key }}">
<input type="hidden" name="duration_ms" id="duration_ms" value="">
<div class="card prompt"><h2>Prompt</h2><div id="prompt">{% set turns = chat_turns(view.prompt) %}
{% if turns %}{% for t in turns %}<div class="turn" data-role="{{ t.role }}"><span class="role">{{ t.role }}</span>
<div class="md" dir="auto">{{ md(t.content) }}</div></div>{% endfor %}
{% else %}<div class="md" dir="auto">{{ md(view.prompt) }}</div>{% endif %}</div></div>
<div class="responses">
{% for r in view.responses %}{% set p = loop.index0 %}
{% set in_pair = 'pairwise' in project.tasks and p < 2 and view.responses|length > 2 %}
<div class="card response{{ ' in-pair' if in_pair else '' }}" id="resp-{{ p }}" data-pos="{{ p }}" tabindex="-1">
<h3>Response {{ letters[p] }}{% if in_pair %} <span class="badge">A/B question</span>{% endif %}</h3><div class="md" dir="auto">{{ md(r) }}</div>
{% if 'binary' in project.tasks %}<fieldset class="row"><legend>Acceptable?</legend>
<label><input type="radio" name="binary_{{ p }}" value="accept" required{{ ' checked' if pre.get('binary_%d' % p) == 'accept' else '' }}> accept</label>
<label><input type="radio" name="binary_{{ p }}" value="reject"{{ ' checked' if pre.get('binary_%d' % p) == 'reject' else '' }}> reject</label></fieldset>{% endif %}
{% if 'likert' in project.tasks %}<fieldset class="row"><legend>Quality 1–5</legend>
{% for v in range(1, 6) %}<label><input type="radio" name="likert_{{ p }}" value="{{ v }}" required{{ ' checked' if pre.get('likert_%d' % p) == v|string else '' }}> {{ v }}</label>
{% endfor %}</fieldset>{% endif %}
</div>{% endfor %}
</div>
{% if 'pairwise' in project.tasks %}
<fieldset class="card task" id="task-pairwise"><legend>Which is better: A or B?{% if view.responses|length > 2 %}
(compare these two only; the other responses are for the other questions){% endif %}</legend>
<div class="row">
<label><input type="radio" name="pairwise_choice" value="A" required{{ ' checked' if pre.get('pairwise_choice') == 'A' else '' }}> A is better</label>
<label><input type="radio" name="pairwise_choice" value="B"{{ ' checked' if pre.get('pairwise_choice') == 'B' else '' }}> B is better</label>
<label><input type="radio" name="pairwise_choice" value="tie"{{ ' checked' if pre.get('pairwise_choice') == 'tie' else '' }}> tie</label></div>
<div class="row">Strength:
<label><input type="radio" name="pairwise_strength" value="1"{{ ' checked' if pre.get('pairwise_strength', '1') == '1' else '' }}> slightly</label>
<label><input type="radio" name="pairwise_strength" value="2"{{ ' checked' if pre.get('pairwise_strength') == '2' else '' }}> clearly</label>
<label><input type="radio" name="pairwise_strength" value="3"{{ ' checked' if pre.get('pairwise_strength') == '3' else '' }}> much</label></div>
</fieldset>{% endif %}
{% if 'ranking' in project.tasks %}
<fieldset class="card task" id="task-ranking"><legend>Rank best (top) to worst: drag, or use the buttons / keys</legend>
{% set rank = pre.get('ranking_order') or range(view.responses|length)|join(',') %}
<ol id="ranking">{% for p in rank.split(',')|map('int') %}
<li draggable="true" data-pos="{{ p }}"><span class="handle" aria-hidden="true">☰</span>
<b>{{ letters[p] }}</b> <span class="snippet" dir="auto">{{ view.responses[p][:80] }}</span>
<button type="button" class="up" aria-label="move {{ letters[p] }} up">▲</button>
<button type="button" class="down" aria-label="move {{ letters[p] }} down">▼</button></li>
{% endfor %}</ol>
<input type="hidden" name="ranking_order" id="ranking_order" value="{{ rank }}">
<input type="hidden" name="ranking_touched" id="ranking_touched" value="">
<label class="confirm"><input type="checkbox" name="ranking_confirmed" id="ranking_confirmed" value="yes"{{ ' checked' if pre.get('ranking_confirmed') == 'yes' else '' }}>
this order is right (or move a response)</label>
</fieldset>{% endif %}
{% if 'critique' in project.tasks %}
<fieldset class="card task" id="task-critique"><legend>Critique</legend>
<label>Response <select name="critique_target" id="critique_target">{% for r in view.responses %}
<option value="{{ loop.index0 }}"{{ ' selected' if pre.get('critique_target') == loop.index0|string else '' }}>{{ letters[loop.index0] }}</option>{% endfor %}</select></label>
<label for="critique_text">What is wrong or could be better?{% if min_critique %}
(at least {{ min_critique }} character{{ 's' if min_critique != 1 else '' }}){% endif %}</label>
<textarea name="critique_text" id="critique_text" rows="3" maxlength="50000"{% if min_critique %} required
minlength="{{ min_critique }}"{% endif %}>{{ pre.get('critique_text', '') }}</textarea>
<label for="critique_rewrite">Rewrite (optional: a better response)</label>
<textarea name="critique_rewrite" id="critique_rewrite" rows="3" maxlength="50000">{{ pre.get('critique_rewrite', '') }}</textarea>
</fieldset>{% endif %}
<p class="error" role="alert" id="client-error" hidden></p>
<button type="submit" id="submit" class="primary">{{ 'Save edit' if editing else 'Submit' }} <kbd>Enter</kbd></button>
</form>
{% if not editing %}<div class="card row marks">
<form method="post" action="/label/{{ view.assignment_id }}/skip" id="skip-form" class="row">
<input type="hidden" name="csrf" value="{{ csrf }}">
<label>Skip because <select name="reason" id="skip-reason">{% for k, v in skip_reasons.items() %}
<option value="{{ k }}">{{ v }}</option>{% endfor %}</select></label>
<label>note <input type="text" name="note" id="skip-note" maxlength="2000"></label>
<button type="submit" id="skip">Skip item</button></form>
<form method="post" action="/label/{{ view.assignment_id }}/flag" id="flag-form" class="row">
<input type="hidden" name="csrf" value="{{ csrf }}">
<label>Flag as <select name="reason" id="flag-reason">{% for k, v in flag_reasons.items() %}
<option value="{{ k }}">{{ v }}</option>{% endfor %}</select></label>
<label>note <input type="text" name="note" id="flag-note" maxlength="2000"></label>
<button type="submit" id="flag">Flag item</button></form></div>{% endif %}
{% endif %}
</section></div>
{% endblock %}
"""

ADMIN = """{% extends "base.html" %}{% block title %}Admin · rlhfkit label{% endblock %}{% block body %}
<section class="card"><h1>Admin</h1>
{% if new_token %}<p class="notice" id="new-token">Token for <b><bdi>{{ new_token.name }}</bdi></b> (shown once):
<code>{{ new_token.token }}</code></p>{% endif %}
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<h2>Labellers</h2>
<table><tr><th>name</th><th>role</th><th>labels</th><th>status</th><th>token / access</th></tr>
{% for u in users %}<tr id="user-{{ u.id }}"><td><bdi>{{ u.name }}</bdi></td><td>{{ u.role }}</td><td>{{ u.labels }}</td>
<td>{{ 'active' if u.active else 'disabled' }}</td><td class="row">
<form method="post" action="/admin/users/{{ u.id }}/rotate" class="inline"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" class="rotate">reset token</button></form>
{% if u.id != user.id %}<form method="post" action="/admin/users/{{ u.id }}/{{ 'disable' if u.active else 'enable' }}" class="inline">
<input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" class="{{ 'disable' if u.active else 'enable' }}">{{ 'disable' if u.active else 'enable' }}</button></form>{% endif %}
</td></tr>{% endfor %}</table>
<form method="post" action="/admin/labellers" class="row">
<input type="hidden" name="csrf" value="{{ csrf }}">
<label>New user <input name="name" required maxlength="100"></label>
<label>role <select name="role" id="new-role"><option value="labeller">labeller</option>
<option value="reviewer">reviewer</option><option value="admin">admin</option></select></label>
<button type="submit" id="add-labeller">Create + token</button></form>
</section>
<section class="card" id="new-project"><h2>New project</h2>
<form method="post" action="/admin/projects/new" enctype="multipart/form-data" class="setup">
<input type="hidden" name="csrf" value="{{ csrf }}">
<label>Name <input type="text" name="name" id="new-project-name" required maxlength="200"></label>
<fieldset class="row"><legend>Tasks</legend>{% for t in ('pairwise', 'ranking', 'binary', 'likert', 'critique') %}
<label><input type="checkbox" name="tasks" value="{{ t }}"{{ ' checked' if t == 'pairwise' else '' }}> {{ t }}</label>{% endfor %}</fieldset>
<label>Labellers per item <input type="number" name="overlap" value="3" min="1" max="100"></label>
{% with settings = {} %}{% include "project_settings.html" %}{% endwith %}
<label for="new-project-guidelines">Guidelines (Markdown)</label>
<textarea name="guidelines" id="new-project-guidelines" rows="3" maxlength="200000"></textarea>
<label>Items (.jsonl, .csv or .parquet) <input type="file" name="file" id="new-project-file" required
accept=".jsonl,.json,.ndjson,.csv,.parquet"></label>
<button type="submit" id="create-project">Create project</button></form></section>
{% for p in projects %}
<section class="card project" id="project-{{ p.id }}"><h2><bdi>{{ p.name }}</bdi>{% if p.archived %}
<span class="badge archived">archived</span>{% endif %}</h2>
<p>{{ p["items"] }} items ({{ p.gold }} gold) · tasks: {{ p.tasks|join(', ') }} · overlap {{ p.overlap }} ·
{{ p.labels }} labels · <a href="/review/{{ p.id }}">review</a> · <a href="/review/{{ p.id }}/progress">progress</a></p>
<details class="setup"><summary>Items, guidelines (version {{ p.version }}), settings, archive</summary>
<form method="post" action="/admin/projects/{{ p.id }}/upload" enctype="multipart/form-data" class="row">
<input type="hidden" name="csrf" value="{{ csrf }}">
<label>More items <input type="file" name="file" required accept=".jsonl,.json,.ndjson,.csv,.parquet"></label>
<button type="submit" class="upload">Upload</button></form>
<form method="post" action="/admin/projects/{{ p.id }}/guidelines">
<input type="hidden" name="csrf" value="{{ csrf }}">
<label>Guidelines (version {{ p.version }}; saving makes a new version)
<textarea name="guidelines" rows="4" maxlength="200000">{{ p.guidelines }}</textarea></label>
<button type="submit" class="save-guidelines">Save guidelines</button></form>
<form method="post" action="/admin/projects/{{ p.id }}/settings" class="row project-settings">
<input type="hidden" name="csrf" value="{{ csrf }}">{% with settings = p %}{% include "project_settings.html" %}{% endwith %}
<button type="submit" class="save-settings">Save settings</button></form>
<form method="post" action="/admin/projects/{{ p.id }}/archive" class="inline">
<input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="archived" value="{{ '0' if p.archived else '1' }}">
<button type="submit" class="archive">{{ 'restore' if p.archived else 'archive' }}</button></form></details>
<h3>Agreement</h3>
<div class="scroll"><table class="agreement"><tr><th>measure</th><th>ratings</th><th>units (≥2 ratings)</th>
<th>α nominal</th><th>α ordinal</th><th>Fleiss κ (units)</th><th>Cohen κ (mean of pairs)</th><th>% agreement</th></tr>
{% for name, m in p.agreement.project.items() %}<tr><td>{{ name }}</td><td>{{ m.ratings }}</td>
<td>{{ m.units }} ({{ m.units_multiply_rated }})</td><td>{{ fmt(m.krippendorff_alpha_nominal) }}</td>
<td>{{ fmt(m.krippendorff_alpha_ordinal) }}</td><td>{{ fmt(m.fleiss_kappa) }} ({{ m.fleiss_units }})</td>
<td>{{ fmt(m.cohen_kappa_mean) }}</td><td>{{ fmt(m.percent_agreement) }}</td></tr>
{% else %}<tr><td colspan="8">{% if p.labels %}{{ p.labels }} labels, none for a task with an agreement measure
{%- else %}no labels yet{% endif %}</td></tr>{% endfor %}</table></div>
{% for note in p.agreement.notes %}<p class="note">{{ note[:1]|upper }}{{ note[1:] }}.</p>{% endfor %}
<h3>Labellers</h3>
<div class="scroll"><table><tr><th>labeller</th><th>labels</th><th>agreement with others</th><th>gold accuracy (items)</th>
<th>flag</th></tr>
{% for name, r in p.agreement.labellers.items() %}<tr class="{{ 'flagged' if r.flag else '' }}"><td><bdi>{{ name }}</bdi></td>
<td>{{ r.labels }}</td><td>{{ fmt(r.agreement_with_others) }}</td><td>{{ fmt(r.gold_accuracy) }} ({{ r.gold_items }})</td>
<td>{{ r.flag or '' }}</td></tr>{% endfor %}</table></div>
<h3>Low-agreement items</h3>
{% if p.agreement.flagged_items %}<ul class="flagged-items">{% for it in p.agreement.flagged_items[:50] %}
<li>item {{ it.item_id }}: agreement {{ fmt(it.agreement) }} over {{ it.rating_pairs }} rating pairs —
<span class="snippet" dir="auto">{{ p.prompts[it.item_id][:100] }}</span></li>{% endfor %}</ul>
{% else %}<p>None below {{ p.agreement.thresholds.min_agreement }}.</p>{% endif %}
<h3>Export</h3><p class="row">
<a class="button" id="export-{{ p.id }}-majority" href="/admin/projects/{{ p.id }}/export.jsonl?kind=pairs&amp;aggregate=majority&amp;ties=drop">pairs (majority, ties dropped)</a>
<a class="button" href="/admin/projects/{{ p.id }}/export.jsonl?kind=pairs&amp;aggregate=soft&amp;ties=keep">pairs (soft, ties kept)</a>
<a class="button" href="/admin/projects/{{ p.id }}/export.jsonl?kind=sft">SFT from rewrites</a>
{% if 'binary' in p.tasks %}<a class="button" href="/admin/projects/{{ p.id }}/export.jsonl?kind=kto">KTO rows (accept/reject)</a>
{% endif %}<a class="button" href="/admin/projects/{{ p.id }}/export.jsonl?kind=labels">raw labels</a></p>
</section>{% endfor %}
{% endblock %}
"""

CSS = """
*{box-sizing:border-box}body{margin:0;font:16px/1.45 system-ui,sans-serif;color:#1b1b1b;background:#f4f5f7}
header{display:flex;gap:1em;align-items:center;padding:.5em 1em;background:#22313f;color:#fff;flex-wrap:wrap}
header .who{margin-left:auto}header button.link{color:#cde;background:none;border:0;text-decoration:underline;
cursor:pointer;font:inherit;min-height:44px;min-width:44px}
main{padding:.75em;max-width:1400px;margin:auto}.card{background:#fff;border:1px solid #d8dbe0;border-radius:8px;
padding:.75em 1em;margin:0 0 .75em}.narrow{max-width:420px;margin:2em auto}
.layout{display:flex;gap:.75em;align-items:flex-start}.guidelines{flex:0 0 300px;position:sticky;top:.5em;
max-height:95vh;overflow:auto}.work{flex:1;min-width:0;max-width:100%}
.responses{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(260px,100%),1fr));gap:.75em}
.response.current{outline:3px solid #3a7bd5}.response.in-pair{border-color:#2d6cdf}
.text,.snippet,.md,bdi{unicode-bidi:isolate}
.badge{font-size:.7em;font-weight:normal;background:#e3ecfb;border-radius:4px;padding:0 .35em;vertical-align:middle}.text{white-space:pre-wrap;overflow-wrap:anywhere}
fieldset{border:1px solid #d8dbe0;border-radius:6px;min-width:0}.row{display:flex;flex-wrap:wrap;gap:.4em 1em;
align-items:center}label{cursor:pointer}input[type=radio]{transform:scale(1.2);margin-right:.3em}
textarea,input[name=token],input[name=name]{width:100%;font:inherit;padding:.4em}
#ranking{padding-left:1.5em}#ranking li{background:#eef2f7;margin:.25em 0;padding:.35em .5em;border-radius:5px;
display:flex;gap:.5em;align-items:center;cursor:grab}#ranking li.current{outline:2px solid #3a7bd5}
#ranking .snippet{flex:1;min-width:0;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
button,.button{font:inherit;padding:.45em .9em;border-radius:6px;border:1px solid #9aa5b1;background:#fff;
cursor:pointer;text-decoration:none;color:inherit;display:inline-block}button.primary{background:#2d6cdf;color:#fff;
border-color:#2d6cdf;width:100%;padding:.7em;font-size:1.1em}
.progress{font-size:1.05em}.error{color:#a30000;background:#fdecec;padding:.5em;border-radius:6px}
.notice{background:#eaf7ea;padding:.5em;border-radius:6px;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e1e4e8;padding:.3em .5em;text-align:left}
tr.flagged,.review-item.disputed{background:#fff3cd}.disagree{background:#f8d7a8}.scroll{overflow-x:auto}kbd{border:1px solid #bbb;border-radius:3px;padding:0 .25em;
font-size:.85em;background:#fafafa}button.primary kbd{background:transparent;color:inherit;border-color:#fff9}.inline{display:inline}
.md pre{background:#f3f4f6;padding:.5em;overflow-x:auto;white-space:pre}.md{overflow-wrap:anywhere}
.turn{border-left:3px solid #9aa5b1;padding:.1em .6em;margin:.4em 0}.turn .role{font-weight:bold;font-size:.85em;
text-transform:uppercase;color:#445}.turn[data-role=user]{border-color:#2d6cdf}.turn[data-role=assistant]{border-color:#2a9d5c}
.work button,.work select,.work input[type=text],.work textarea,.marks button{min-height:44px;min-width:44px}
.work label:has(input[type=radio]),.work label:has(input[type=checkbox]){display:inline-flex;align-items:center;
min-height:44px;min-width:44px;padding:0 .3em}.work .row label:has(select),.work .row label:has(input[type=text]){
display:inline-flex;align-items:center;gap:.3em;min-height:44px}
summary{cursor:pointer;min-height:44px;padding:.6em 0}
@media (max-width:760px){.layout{flex-direction:column;align-items:stretch}.guidelines{position:static;flex:none;width:100%;
max-height:none}main{padding:.4em}.work{width:100%}
/* phone: open guidelines scroll inside a third of the screen, so the prompt is in view on load */
.guidelines .md{max-height:35vh;overflow:auto}}
"""

JS = r"""
(function () {
  'use strict';
  var form = document.getElementById('label-form');
  if (!form) return;
  var started = Date.now();
  var k = parseInt(form.dataset.k, 10);
  var current = 0;
  var responses = Array.prototype.slice.call(document.querySelectorAll('.response'));
  var list = document.getElementById('ranking');
  var orderInput = document.getElementById('ranking_order');

  var touched = document.getElementById('ranking_touched');
  var confirmBox = document.getElementById('ranking_confirmed');

  function setCurrent(p, scroll) {
    current = (p + k) % k;
    responses.forEach(function (el, i) { el.classList.toggle('current', i === current); });
    if (list) Array.prototype.forEach.call(list.children, function (li) {
      li.classList.toggle('current', parseInt(li.dataset.pos, 10) === current);
    });
    // not on load: a tall first response would scroll the prompt out of view
    if (scroll !== false && responses[current]) responses[current].scrollIntoView({block: 'nearest'});
  }
  function syncOrder() {
    if (!list) return;
    orderInput.value = Array.prototype.map.call(list.children, function (li) { return li.dataset.pos; }).join(',');
  }
  function markMoved() { if (touched) touched.value = 'moved'; }
  function move(pos, delta) {
    var li = list.querySelector('li[data-pos="' + pos + '"]');
    if (!li) return;
    if (delta < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
    if (delta > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
    markMoved();
    syncOrder();
  }
  function check(name, value) {
    var el = form.querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (el) { el.checked = true; el.dispatchEvent(new Event('change', {bubbles: true})); }
  }
  if (list) {
    var dragged = null;
    list.addEventListener('dragstart', function (e) {
      dragged = e.target.closest('li'); e.dataTransfer.effectAllowed = 'move';
      e.dataTransfer.setData('text/plain', dragged.dataset.pos);
    });
    list.addEventListener('dragover', function (e) {
      e.preventDefault();
      var over = e.target.closest('li');
      if (!dragged || !over || over === dragged) return;
      var rect = over.getBoundingClientRect();
      list.insertBefore(dragged, (e.clientY - rect.top) > rect.height / 2 ? over.nextSibling : over);
    });
    list.addEventListener('drop', function (e) { e.preventDefault(); markMoved(); syncOrder(); });
    list.addEventListener('dragend', function () { if (dragged) markMoved(); dragged = null; syncOrder(); });
    list.addEventListener('click', function (e) {
      var b = e.target.closest('button'); if (!b) return;
      move(parseInt(b.closest('li').dataset.pos, 10), b.classList.contains('up') ? -1 : 1);
    });
  }
  responses.forEach(function (el, i) { el.addEventListener('click', function () { setCurrent(i); }); });
  form.addEventListener('submit', function (e) {
    syncOrder();
    if (list && touched && touched.value !== 'moved' && !(confirmBox && confirmBox.checked)) {
      e.preventDefault();  // the server refuses it too (422): say so here, before anything is lost
      var msg = document.getElementById('client-error');
      msg.textContent = "Please rank the responses: move one, or tick 'this order is right'.";
      msg.hidden = false;
      if (confirmBox) confirmBox.focus({preventScroll: false});
      return;
    }
    document.getElementById('duration_ms').value = String(Date.now() - started);
    var btn = document.getElementById('submit'); if (btn) btn.disabled = true;  // the key makes a resend safe
  });
  document.addEventListener('keydown', function (e) {
    var tag = (e.target.tagName || '').toLowerCase();
    var typing = tag === 'textarea' || (tag === 'input' && e.target.type === 'text') || tag === 'select';
    if (typing) {
      if (e.key === 'Escape') { e.target.blur(); e.preventDefault(); }
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    // Enter on a button or link (log out, ▲/▼, ...) does that control's own action, never a submit
    if (e.key === 'Enter' && (tag === 'button' || tag === 'a' || tag === 'summary')) return;
    var key = e.key, handled = true;
    if (key === 'j') setCurrent(current + 1);
    else if (key === 'k') setCurrent(current - 1);
    else if (key === 'a') check('pairwise_choice', 'A');
    else if (key === 'b') check('pairwise_choice', 'B');
    else if (key === 't') check('pairwise_choice', 'tie');
    else if (key === 's') {
      var cur = form.querySelector('input[name="pairwise_strength"]:checked');
      check('pairwise_strength', cur ? (parseInt(cur.value, 10) % 3) + 1 : 1);
    }
    else if (key === 'u' && list) move(current, -1);
    else if (key === 'd' && list) move(current, 1);
    else if (key === 'y') check('binary_' + current, 'accept');
    else if (key === 'n') check('binary_' + current, 'reject');
    else if (/^[1-5]$/.test(key)) check('likert_' + current, key);
    else if (key === 'c' && document.getElementById('critique_text')) {
      var sel = document.getElementById('critique_target'); if (sel) sel.value = String(current);
      document.getElementById('critique_text').focus();
    }
    else if (key === 'r' && document.getElementById('critique_rewrite')) document.getElementById('critique_rewrite').focus();
    else if (key === 'Enter') form.requestSubmit();
    else handled = false;
    if (handled) e.preventDefault();
  });
  setCurrent(0, false);
})();
"""
