"""The labelling app's logic, independent of HTTP: projects, labellers and tokens, assignment, submission.

Response order: every assignment stores a random permutation ``order`` (display position -> original
index). Clients answer in display positions; :func:`submit` maps the answers back to original indices
before storing them, so every stored label, agreement figure and export uses original indices.

Pairwise choice compares the first two responses shown (A and B). For an item with K > 2 responses the
assignment picks that pair (:func:`pick_pair`: the pair asked least often so far among the item's
assignments, so its R labellers spread over the K(K-1)/2 pairs) and puts it first in ``order`` in a
random orientation; the label stores ``pair`` in original indices. A project whose only task is pairwise
shows just the pair.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import secrets
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import DataError
from .db import Assignment, Database, Item, Label, Project, User
from .rules import critique_problem, min_critique
from .text import check_strings, check_text, scrub

TASKS = ("pairwise", "ranking", "binary", "likert", "critique")
MAX_RESPONSES = 16
MAX_TEXT = 50_000  # characters per prompt / response / critique
MAX_IMPORT_BYTES = 50 * 1024 * 1024
_rng = random.SystemRandom()


class LabelError(Exception):
    """A request that cannot be served: ``status`` is the HTTP status, ``detail`` one line."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# ---- tokens and users -------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "rlk_" + secrets.token_urlsafe(32)


def create_user(db: Database, name: str, role: str = "labeller") -> tuple[User, str]:
    """A new user and their access token (shown once; only its hash is stored)."""
    if role not in ("admin", "labeller", "reviewer"):
        raise LabelError(422, f"role must be admin, labeller or reviewer, got {role!r}")
    name = name.strip()
    if not name or len(name) > 100:
        raise LabelError(422, "name must be 1..100 characters")
    check_text(name, "name")
    token = new_token()
    try:
        with db.session() as s:
            user = User(name=name, role=role, token_hash=hash_token(token))
            s.add(user)
            s.flush()
    except IntegrityError:
        raise LabelError(409, f"a user named {name!r} already exists") from None
    return user, token


def authenticate(s: Session, token: str | None) -> User | None:
    if not token or len(token) > 200:
        return None
    user = s.scalar(sa.select(User).where(User.token_hash == hash_token(token)))
    return user if user is not None and user.active else None


# ---- projects and items -----------------------------------------------------------------------------


def check_item(row: Any, source: str, rownum: int) -> dict[str, Any]:
    """One import row validated: ``prompt`` (str), ``responses`` (2..16 strings), optional ``gold`` (index) and
    ``priority`` (a finite number: served higher first; not part of the item's identity); every other key is
    kept as the item's ``meta``. All text passes :func:`text.check_strings`."""
    if not isinstance(row, dict):
        raise DataError("expected a JSON object", source=source, row=rownum)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("expected a non-empty string", source=source, row=rownum, field="prompt")
    if len(prompt) > MAX_TEXT:
        raise DataError(f"longer than {MAX_TEXT} characters", source=source, row=rownum, field="prompt")
    check_text(prompt, "prompt", source=source, row=rownum)
    responses = row.get("responses")
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RESPONSES:
        raise DataError(f"expected a list of 2..{MAX_RESPONSES} responses", source=source, row=rownum,
                        field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"response {i} is not a string", source=source, row=rownum, field="responses")
        if len(r) > MAX_TEXT:
            raise DataError(f"response {i} is longer than {MAX_TEXT} characters", source=source, row=rownum,
                            field="responses")
        check_text(r, f"responses[{i}]", source=source, row=rownum)
    gold = row.get("gold")
    if gold is not None:
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(responses):
            raise DataError(f"expected the index (0..{len(responses) - 1}) of the best response, got {gold!r}",
                            source=source, row=rownum, field="gold")
    priority = row.get("priority")
    try:  # a number, or its text (a CSV cell)
        priority = None if priority is None else math.nan if isinstance(priority, bool) else float(priority)
    except (TypeError, ValueError):
        priority = math.nan
    if priority is not None and not math.isfinite(priority):
        raise DataError(f"expected a finite number, got {row['priority']!r}", source=source, row=rownum,
                        field="priority")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "responses", "gold", "priority")}
    check_strings(meta, "", source=source, row=rownum)
    return {"prompt": prompt, "responses": list(responses), "gold": gold, "meta": meta or None, "priority": priority}


def jsonl_lines(path: str | Path, max_bytes: int = MAX_IMPORT_BYTES) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 JSONL file's lines, a leading byte-order mark dropped. Lines are split
    on ``\\n`` only: U+2028 and friends are valid inside JSON strings."""
    file = Path(path)
    if not file.exists():
        raise DataError("file not found", source=str(path))
    if file.stat().st_size > max_bytes:
        raise DataError(f"larger than the import limit of {max_bytes} bytes", source=str(path))
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not UTF-8 ({exc.reason})", source=str(path), row=row) from None
    return list(enumerate(text.split("\n"), start=1))


def read_items(path: str | Path, max_bytes: int = MAX_IMPORT_BYTES) -> list[dict[str, Any]]:
    """Import rows from a JSONL file; any bad row is a one-line DataError naming file, row and field."""
    items = []
    for n, line in jsonl_lines(path, max_bytes):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg})", source=str(path), row=n) from None
        items.append(check_item(row, str(path), n))
    if not items:
        raise DataError("no rows", source=str(path))
    return items


def check_tasks(tasks: list[str]) -> list[str]:
    tasks = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise LabelError(422, f"unknown task type(s) {bad or tasks}; choose from {', '.join(TASKS)}")
    return tasks


def content_hash(item: dict[str, Any]) -> str:
    """An item's identity: SHA-256 of its prompt, responses (in order) and metadata; not ``gold``, so a
    re-import with a corrected gold index is still recognised as the same item."""
    key = json.dumps([item["prompt"], list(item["responses"]), item.get("meta") or {}], sort_keys=True,
                     ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def import_items(db: Database, name: str, items: list[dict[str, Any]], tasks: list[str] | None = None,
                 overlap: int | None = None, guidelines: str | None = None) -> tuple[Project, int, int]:
    """Create the project (or add to it) and append the ``items`` it does not hold yet; returns the project,
    the items added and the duplicates skipped (same :func:`content_hash` as an item already in the
    project, or earlier in ``items``). ``tasks`` for an existing project must be the tasks it has (in any
    order): changing them under existing labels is refused (409)."""
    check_text(name, "name")
    if guidelines is not None:
        check_text(guidelines, "guidelines")
    if tasks is not None:
        check_strings(tasks, "tasks")
        tasks = check_tasks(tasks)
    if overlap is not None and not 1 <= overlap <= 100:
        raise LabelError(422, f"overlap must be 1..100, got {overlap}")
    with db.session() as s:
        # the row lock (PostgreSQL) serialises concurrent imports into one project, so both cannot add an item
        project = s.scalar(sa.select(Project).where(Project.name == name).with_for_update())
        if project is None:
            project = Project(name=name, tasks=tasks or ["pairwise"], overlap=overlap or 3,
                              guidelines=guidelines or "")
            s.add(project)
            s.flush()
            seen: set[str] = set()
        else:
            if tasks is not None and set(tasks) != set(project.tasks):
                raise LabelError(409, f"project {name!r} already has the tasks {','.join(project.tasks)}; "
                                      f"refusing to change them to {','.join(tasks)} (leave out --tasks to add "
                                      "items, or import into a new project)")
            if overlap is not None:
                project.overlap = overlap
            if guidelines is not None:
                project.guidelines = guidelines
            seen = {content_hash({"prompt": p, "responses": r, "meta": m}) for p, r, m in s.execute(
                sa.select(Item.prompt, Item.responses, Item.meta).where(Item.project_id == project.id))}
        fresh = []
        for it in items:
            h = content_hash(it)
            if h not in seen:
                seen.add(h)
                fresh.append(it)
        start = s.scalar(sa.select(sa.func.coalesce(sa.func.max(Item.position), -1))
                         .where(Item.project_id == project.id)) + 1
        s.add_all(Item(project_id=project.id, position=start + i, prompt=it["prompt"],
                       responses=it["responses"], gold=it.get("gold"), meta=it.get("meta"),
                       priority=it.get("priority"))
                  for i, it in enumerate(fresh))
    return project, len(fresh), len(items) - len(fresh)


def upsert_project(db: Database, name: str, items: list[dict[str, Any]], tasks: list[str] | None = None,
                   overlap: int | None = None, guidelines: str | None = None) -> tuple[Project, int]:
    """:func:`import_items` without the count of duplicates skipped: (project, items added)."""
    project, added, _ = import_items(db, name, items, tasks, overlap, guidelines)
    return project, added


def get_project(s: Session, project_id: int) -> Project:
    project = s.get(Project, project_id)
    if project is None:
        raise LabelError(404, f"no project {project_id}")
    return project


def project_by_name(s: Session, name: str) -> Project:
    check_text(name, "project")
    project = s.scalar(sa.select(Project).where(Project.name == name))
    if project is None:
        raise LabelError(404, f"no project named {name!r}")
    return project


# ---- assignment -------------------------------------------------------------------------------------


def _available(project: Project, user_id: int):
    """Items this user may still receive: never assigned to them, and a free slot (gold: always)."""
    mine = sa.select(Assignment.item_id).where(Assignment.user_id == user_id,
                                              Assignment.project_id == project.id)
    taken = (sa.select(sa.func.count(Assignment.id)).where(Assignment.item_id == Item.id,  # released: free again
             Assignment.released_at.is_(None)).correlate(Item).scalar_subquery())
    return (Item.project_id == project.id, Item.id.not_in(mine), sa.literal(project.archived_at is None),
            sa.or_(Item.gold.is_not(None), taken < project.overlap))  # an archived project serves nothing


def pick_pair(k: int, asked: Sequence[Sequence[int]], rng: random.Random = _rng) -> tuple[int, int]:
    """The pair (original indices) to ask next about an item with ``k`` responses, given the pairs already
    ``asked`` of it: one asked least often; among those, one whose responses were compared least often
    (so R labellers of K = 4 see disjoint pairs before repeating a response), then at random."""
    times = Counter(frozenset(p) for p in asked)
    shown = Counter(i for p in asked for i in p)

    def load(p: tuple[int, int]) -> tuple[int, int]:
        return times[frozenset(p)], shown[p[0]] + shown[p[1]]

    pairs = list(itertools.combinations(range(k), 2))
    least = min(map(load, pairs))
    return rng.choice([p for p in pairs if load(p) == least])


def display_order(k: int, pair: Sequence[int] | None = None, rng: random.Random = _rng) -> list[int]:
    """A random display order (display position -> original index); with ``pair``, those two come first
    (the pairwise A and B) in a random orientation, the others shuffled after them."""
    first = list(pair or [])
    rest = [i for i in range(k) if i not in first]
    rng.shuffle(first)
    rng.shuffle(rest)
    return first + rest


def shown_order(tasks: Sequence[str], order: Sequence[int]) -> list[int]:
    """The original indices shown, in display order: all, or only the compared pair when pairwise is the
    project's only task (the others would be read for nothing)."""
    return list(order) if set(tasks) - {"pairwise"} else list(order[:2])


def next_assignment(db: Database, user: User, project_id: int, rng: random.Random = _rng) -> Assignment | None:
    """The user's open assignment in the project, or a new one (None when nothing is left for them). ``rng``
    draws its pair and display order (unpredictable by default; a seeded one makes a simulation repeatable).

    Items are served by ``priority`` (higher first, NULL last), then in import order. A new assignment takes
    the lowest free slot of its item. SQLite serialises write transactions
    (``BEGIN IMMEDIATE``). On PostgreSQL the labeller's row is locked first (two tabs asking at once still get
    one open assignment) and the item is taken with ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent
    labellers take different items instead of racing for one slot; ``with_for_update`` renders nothing on
    SQLite. The unique constraints (item, slot) and (item, user) back this up on every backend, and a lost
    race is retried.
    """
    for _ in range(20):
        try:
            with db.session() as s:
                project = get_project(s, project_id)
                s.execute(sa.select(User.id).where(User.id == user.id).with_for_update())
                open_one = s.scalar(sa.select(Assignment).where(
                    Assignment.user_id == user.id, Assignment.project_id == project_id,
                    Assignment.done.is_(False)).order_by(Assignment.id).limit(1))
                if open_one is not None:
                    return open_one
                query = sa.select(Item).where(*_available(project, user.id)).order_by(  # NULL last, portably
                    Item.priority.is_(None), Item.priority.desc(), Item.position).limit(1)
                item = s.scalar(query.with_for_update(of=Item, skip_locked=True))
                if item is None:  # what is left may be locked by others filling it: wait for them, then decide
                    item = s.scalar(query.with_for_update(of=Item))
                    if item is None:
                        return None
                taken = s.execute(sa.select(Assignment.slot, Assignment.order)
                                  .where(Assignment.item_id == item.id)).all()
                slot = None
                if item.gold is None:
                    free = set(range(project.overlap)) - {used for used, _ in taken}
                    if not free:
                        continue  # filled while we waited for its lock: look again
                    slot = min(free)
                k = len(item.responses)
                pair = pick_pair(k, [order[:2] for _, order in taken], rng) if "pairwise" in project.tasks else None
                assignment = Assignment(item_id=item.id, user_id=user.id, project_id=project_id, slot=slot,
                                        order=display_order(k, pair, rng))
                s.add(assignment)
                s.flush()
                return assignment
        except IntegrityError:
            continue
    raise LabelError(503, "could not assign an item (too much contention); retry")


def progress(s: Session, user: User, project: Project) -> dict[str, int]:
    done = s.scalar(sa.select(sa.func.count(Label.id)).where(Label.user_id == user.id,
                                                           Label.project_id == project.id))
    open_count = s.scalar(sa.select(sa.func.count(Assignment.id)).where(
        Assignment.user_id == user.id, Assignment.project_id == project.id, Assignment.done.is_(False)))
    available = s.scalar(sa.select(sa.func.count(Item.id)).where(*_available(project, user.id)))
    return {"done": int(done), "remaining": int(open_count) + int(available)}


def own_assignment(s: Session, user: User, assignment_id: int) -> Assignment:
    """The assignment if it is this user's; otherwise 404 (no hint that it exists)."""
    assignment = s.get(Assignment, assignment_id)
    if assignment is None or assignment.user_id != user.id:
        raise LabelError(404, f"no assignment {assignment_id}")
    return assignment


def assignment_view(s: Session, assignment: Assignment) -> dict[str, Any]:
    """What the labeller sees: prompt and responses in their display order (no original indices); the
    pairwise question is about the first two."""
    item = s.get(Item, assignment.item_id)
    project = s.get(Project, assignment.project_id)
    return {"assignment_id": assignment.id, "project_id": project.id, "project": project.name,
            "tasks": list(project.tasks), "guidelines": scrub(project.guidelines), "prompt": scrub(item.prompt),
            "responses": [scrub(item.responses[i]) for i in shown_order(project.tasks, assignment.order)],
            "done": assignment.done}


# ---- submission -------------------------------------------------------------------------------------


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise LabelError(422, message)


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def map_answers(tasks: list[str], order: list[int], answers: Any, min_critique_chars: int = 0) -> dict[str, Any]:
    """Validate answers given in display positions and return them in original response indices."""
    _need(isinstance(answers, dict), "answers must be an object keyed by task type")
    check_strings(answers, "answers")
    order = shown_order(tasks, order)
    k = len(order)
    out: dict[str, Any] = {}
    missing = [t for t in tasks if t not in answers]
    _need(not missing, f"answers missing for task(s): {', '.join(missing)}")
    extra = [t for t in answers if t not in tasks]
    _need(not extra, f"answers for task(s) this project does not ask: {', '.join(map(str, extra))}")
    for task in tasks:
        a = answers[task]
        _need(isinstance(a, dict), f"{task}: expected an object")
        if task == "pairwise":
            choice = a.get("choice")
            _need(choice in ("A", "B", "tie"), "pairwise.choice must be 'A', 'B' or 'tie'")
            strength = a.get("strength", 1)
            _need(_int_in(strength, 1, 3), "pairwise.strength must be 1, 2 or 3")
            pair = [order[0], order[1]]  # the assignment's pair, as shown (A, B)
            winner = None if choice == "tie" else pair[0 if choice == "A" else 1]
            out[task] = {"pair": pair, "winner": winner, "strength": strength if winner is not None else 0}
        elif task == "ranking":
            ranking = a.get("order")
            _need(isinstance(ranking, list) and len(ranking) == k and all(_int_in(x, 0, k - 1) for x in ranking)
                  and len(set(ranking)) == k, f"ranking.order must be a permutation of 0..{k - 1}")
            out[task] = {"ranking": [order[p] for p in ranking]}
        elif task == "binary":
            accept = a.get("accept")
            _need(isinstance(accept, list) and len(accept) == k and all(isinstance(x, bool) for x in accept),
                  f"binary.accept must be a list of {k} booleans")
            stored = [False] * k
            for p, v in enumerate(accept):
                stored[order[p]] = v
            out[task] = {"accept": stored}
        elif task == "likert":
            ratings = a.get("ratings")
            _need(isinstance(ratings, list) and len(ratings) == k and all(_int_in(x, 1, 5) for x in ratings),
                  f"likert.ratings must be a list of {k} integers 1..5")
            stored = [0] * k
            for p, v in enumerate(ratings):
                stored[order[p]] = v
            out[task] = {"ratings": stored}
        elif task == "critique":
            text, rewrite, target = a.get("critique", ""), a.get("rewrite"), a.get("target", 0)
            _need(isinstance(text, str), "critique.critique must be a string")
            _need(len(text) <= MAX_TEXT, f"critique.critique is too long: at most {MAX_TEXT} characters")
            _need(critique_problem(text, min_critique_chars) is None,
                  f"critique.critique: {critique_problem(text, min_critique_chars)}")
            _need(rewrite is None or isinstance(rewrite, str), "critique.rewrite must be a string or null")
            _need(rewrite is None or len(rewrite) <= MAX_TEXT,
                  f"critique.rewrite is too long: at most {MAX_TEXT} characters")
            _need(_int_in(target, 0, k - 1), f"critique.target must be a display position 0..{k - 1}")
            out[task] = {"response": order[target], "critique": text,
                         "rewrite": rewrite if rewrite and rewrite.strip() else None}
    return out


def gold_score(gold: int | None, answers: dict[str, Any]) -> float | None:
    """Share of the gold-checkable tasks answered in line with the gold best response."""
    if gold is None:
        return None
    hits = []
    if "pairwise" in answers and gold in answers["pairwise"]["pair"]:
        hits.append(answers["pairwise"]["winner"] == gold)
    if "ranking" in answers:
        hits.append(answers["ranking"]["ranking"][0] == gold)
    if "binary" in answers:
        hits.append(bool(answers["binary"]["accept"][gold]))
    if "likert" in answers:
        ratings = answers["likert"]["ratings"]
        hits.append(ratings[gold] == max(ratings))
    return sum(hits) / len(hits) if hits else None


def check_key(key: Any) -> str:
    _need(isinstance(key, str) and 8 <= len(key) <= 100 and key.isascii() and key.isprintable(),
          "idempotency_key must be 8..100 printable ASCII characters")
    return key


def submit(db: Database, user: User, assignment_id: int, key: str, answers: Any,
           duration_ms: int | None = None) -> tuple[Label, bool]:
    """Store a label; returns (label, created). Acknowledge only after this returns: it has committed.

    The same idempotency key again returns the stored label with ``created=False`` (a retry is not
    counted twice); a different key for an assignment already labelled is a 409.
    """
    key = check_key(key)
    if duration_ms is not None:
        _need(_int_in(duration_ms, 0, 10**9), "duration_ms must be a non-negative integer")
    for _ in range(2):
        try:
            with db.session() as s:
                existing = s.scalar(sa.select(Label).where(Label.idempotency_key == key))
                if existing is not None:
                    if existing.user_id != user.id or existing.assignment_id != assignment_id:
                        raise LabelError(409, "idempotency_key already used for another submission")
                    return existing, False
                assignment = own_assignment(s, user, assignment_id)
                if assignment.done:
                    raise LabelError(409, f"assignment {assignment_id} is already labelled")
                project = s.get(Project, assignment.project_id)
                item = s.get(Item, assignment.item_id)
                stored = map_answers(list(project.tasks), list(assignment.order), answers, min_critique(project))
                label = Label(assignment_id=assignment.id, item_id=item.id, user_id=user.id,
                              project_id=project.id, idempotency_key=key, answers=stored,
                              gold_correct=gold_score(item.gold, stored), duration_ms=duration_ms)
                s.add(label)
                assignment.done = True
                s.flush()
            return label, True
        except IntegrityError:
            continue  # a concurrent retry with the same key won: the next pass returns its label
    raise LabelError(409, f"assignment {assignment_id} is already labelled")
