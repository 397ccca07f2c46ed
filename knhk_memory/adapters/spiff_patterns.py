"""Which workflow control-flow pattern each SpiffWorkflow task spec carries out.

The pattern ids are those of knhk-memory's table of the 43 workflow
control-flow patterns (``knhk_memory/data/wcp-control-flow-patterns.tsv``;
N. Russell, A.H.M. ter Hofstede, W.M.P. van der Aalst, N. Mulyar, *Workflow
Control-Flow Patterns: A Revised View*, BPM Center Report BPM-06-22, 2006). A
BPMN element is mapped to the pattern whose definition in that report it
implements, using both its task-spec class and its place in the process graph
(a parallel gateway with several outgoing flows is a Parallel Split; with
several incoming flows, a Synchronization). A node may carry several
patterns (a gateway that merges and splits; a merge that a loop returns to):

- ``ParallelGateway``: more than one outgoing flow, 2 Parallel Split; more
  than one incoming flow, 3 Synchronization.
- ``ExclusiveGateway``: split, 4 Exclusive Choice; merge, 5 Simple Merge.
- ``InclusiveGateway``: split, 6 Multi-Choice; join, 7 Structured
  Synchronizing Merge.
- ``EventBasedGateway``: 16 Deferred Choice.
- ``ParallelMultiInstanceTask``: ``loopCardinality`` an integer literal, 13
  Multiple Instances with a Priori Design-Time Knowledge; an expression or an
  input collection, 14 ... Run-Time Knowledge; with a ``completionCondition``,
  also 34 Static Partial Join for Multiple Instances.
- ``StandardLoopTask``, ``SequentialMultiInstanceTask``: 21 Structured Loop.
- The node where a cycle of sequence flows is entered: 21 Structured Loop if
  the cycle has one entry and one exit, else 10 Arbitrary Cycles.
- ``BoundaryEvent``, interrupting: attached to a task, 19 Cancel Task; to a
  subprocess or call activity, 25 Cancel Region.
- Message catch events and ``ReceiveTask``: 24 Persistent Trigger; signal
  catch events (caught only while waiting): 23 Transient Trigger.
- ``EndEvent`` with a terminate definition: 43 Explicit Termination.
- ``_EndJoin`` (SpiffWorkflow's end of a (sub)process, reached when all its
  end events are): 11 Implicit Termination.
- An activity (no gateway) with more than one incoming flow: 8 Multi-Merge
  (each token runs it again; for an activity with boundary events, counted
  at SpiffWorkflow's ``BoundaryEventSplit`` before it, where the flows
  meet); with more than one outgoing flow: 2 Parallel
  Split (BPMN's uncontrolled flow; SpiffWorkflow's parser refuses it today).
- Anything else: 1 Sequence. Tasks, start and plain end events, subprocesses
  and call activities, timers, and SpiffWorkflow's internal start and
  boundary split/join tasks.

Notes on the choices (the report's definitions are the reference):

- WCP-7 for the inclusive join follows the report's BPMN rating; SpiffWorkflow
  joins when no token can still arrive, which in a structured model is WCP-7.
- Sequential multi-instance runs its instances one after another: iteration
  (WCP-21), not a multiple-instance pattern, whose definitions need the
  instances to run concurrently.
- A cycle of sequence flows with one entry and one exit is a structured loop
  (WCP-21: "a loop with a single entry and exit point"); WCP-10 is the cycle
  with more than one of either. The pattern is counted at the node where the
  cycle is entered (the merge the loop returns to), once per pass through it.
- A terminate end event ends the instance and cancels what is left, which is
  the report's Explicit Termination; a plain end event is a step, and the
  instance ends when nothing is left to do (Implicit Termination, counted at
  SpiffWorkflow's ``_EndJoin``, once per (sub)process instance).
- A subprocess or call activity is decomposition, not a control-flow pattern:
  it is a step in sequence (WCP-1). Recursion (WCP-22) is not detected
  (SpiffWorkflow's parser resolves called processes eagerly).

This module imports nothing from SpiffWorkflow: it reads class names along
the task spec's method resolution order, so the plain BPMN, "spiff" and
Camunda flavours of each class are recognised alike.
"""

from __future__ import annotations

from typing import Any

__all__ = ["task_spec_patterns", "process_patterns", "SEQUENCE"]

SEQUENCE = (1,)
_GATEWAYS = {"ParallelGateway": (2, 3), "ExclusiveGateway": (4, 5), "InclusiveGateway": (6, 7)}
_PLUMBING = {"BpmnStartTask", "BoundaryEventSplit", "BoundaryEventJoin", "StartEventSplit", "StartEventJoin",
             "SimpleBpmnTask"}


def _mro_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _event_kind(ts: Any) -> str:
    """The class name of a catching event's definition (``MessageEventDefinition``...)."""
    ed = getattr(ts, "event_definition", None)
    return type(ed).__name__ if ed is not None else ""


def _cycles(task_specs: dict[str, Any]) -> dict[str, int]:
    """``{node name: pattern}`` for every node where a cycle of the flow graph is
    entered: 21 (one entry, one exit) or 10 (more). Tarjan's strongly connected
    components, iterative (no recursion limit on long models)."""
    succ = {n: [o for o in getattr(ts, "_outputs", ()) if o in task_specs] for n, ts in task_specs.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in task_specs:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            recurse = False
            for j in range(i, len(succ[v])):
                w = succ[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in succ[v]:
                    comps.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    out: dict[str, int] = {}
    for comp in comps:
        members = set(comp)
        entries = [n for n in comp if any(p not in members for p in getattr(task_specs[n], "_inputs", ()))]
        exits = sum(1 for n in comp for o in succ[n] if o not in members)
        pattern = 21 if len(entries) <= 1 and exits <= 1 else 10
        for n in entries or comp[:1]:
            out[n] = pattern
    return out


def task_spec_patterns(ts: Any, cycle: int | None = None) -> tuple[int, ...]:
    """The WCP ids (sorted) one task spec carries out, by the rules of the
    module docstring. ``cycle`` is the pattern of a cycle entered at this node
    (from :func:`process_patterns`), if any.

    :param ts: a SpiffWorkflow ``TaskSpec`` (any flavour).
    :returns: a non-empty tuple of ids in 1..43; ``(1,)`` for a plain step.
    """
    names = _mro_names(ts)
    n_in, n_out = _degree(ts, "_inputs"), _degree(ts, "_outputs")
    found: set[int] = set()
    gateway = next((g for g in _GATEWAYS if g in names), None)
    if gateway is not None:
        split, join = _GATEWAYS[gateway]
        if n_out > 1:
            found.add(split)
        if n_in > 1:
            found.add(join)
    elif "EventBasedGateway" in names:
        found.add(16)
    elif "ParallelMultiInstanceTask" in names:
        card = getattr(ts, "cardinality", None)
        found.add(13 if isinstance(card, str) and card.strip().isdigit() else 14)
        if getattr(ts, "condition", None):
            found.add(34)
    elif "SequentialMultiInstanceTask" in names or "StandardLoopTask" in names:
        found.add(21)
    elif "BoundaryEvent" in names:
        kind = _event_kind(ts)
        if "Message" in kind:
            found.add(24)
        elif "Signal" in kind:
            found.add(23)
        if getattr(ts, "cancel_activity", False):
            attached = _attached_to(ts)
            found.add(25 if attached is not None and "SubWorkflowTask" in _mro_names(attached) else 19)
    elif "EndEvent" in names:
        if _event_kind(ts) == "TerminateEventDefinition":
            found.add(43)
    elif "_EndJoin" in names:
        found.add(11)
    elif "CatchingEvent" in names:  # intermediate catch events, receive tasks
        kind = _event_kind(ts)
        if "Message" in kind or "ReceiveTask" in names:
            found.add(24)
        elif "Signal" in kind:
            found.add(23)
    if gateway is None and "EventBasedGateway" not in names:
        plumbing = bool(names & _PLUMBING)
        if n_out > 1 and not plumbing and "BoundaryEvent" not in names:
            found.add(2)  # BPMN uncontrolled flow: every outgoing flow gets a token
        if n_in > 1 and "_EndJoin" not in names and (not plumbing or "BoundaryEventSplit" in names):
            # each incoming token runs the activity again (for an activity with boundary events,
            # SpiffWorkflow's split before it is where the flows meet)
            found.add(8)
    if cycle is not None:
        found.add(cycle)
    return tuple(sorted(found)) or SEQUENCE


def _degree(ts: Any, side: str) -> int:
    """Incoming or outgoing sequence flows of a node, not counting SpiffWorkflow's
    own boundary-event split and join around an activity (not BPMN flows)."""
    links = getattr(ts, side, ())
    spec = getattr(ts, "_wf_spec", None)
    if spec is None:
        return len(links)
    n = 0
    for name in links:
        other = spec.task_specs.get(name)
        if other is None or not ({"BoundaryEventSplit", "BoundaryEventJoin"} & _mro_names(other)):
            n += 1
    return n


def _attached_to(boundary: Any) -> Any:
    """The activity an interrupting boundary event cancels: SpiffWorkflow puts a
    ``BoundaryEventSplit`` before both; its output that is not a boundary event."""
    spec = getattr(boundary, "_wf_spec", None)
    if spec is None:
        return None
    for name in getattr(boundary, "_inputs", ()):
        split = spec.task_specs.get(name)
        if split is None or "BoundaryEventSplit" not in _mro_names(split):
            continue
        for out in getattr(split, "_outputs", ()):
            t = spec.task_specs.get(out)
            if t is not None and "BoundaryEvent" not in _mro_names(t):
                return t
    return None


def process_patterns(spec: Any) -> dict[str, tuple[int, ...]]:
    """``{task spec name: WCP ids}`` for every task spec of a SpiffWorkflow
    process spec (``BpmnProcessSpec``), cycles included."""
    task_specs = spec.task_specs
    cycles = _cycles(task_specs)
    return {name: task_spec_patterns(ts, cycles.get(name)) for name, ts in task_specs.items()}
