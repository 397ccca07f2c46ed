"""Generated BPMN and DMN models for testing and benchmarking the SpiffWorkflow adapter.

:func:`generate` writes a directory of ``.bpmn`` and ``.dmn`` files written
here (none comes from SpiffWorkflow's repository) with the SpiffWorkflow
("spiff") extensions: for ``files`` model files, two executable processes
each (an order process and a refund process), plus a library file of called
processes and DMN files of decision tables. Together they cover sequence
flows, exclusive gateways with conditions and defaults, parallel gateways
(2-4 branches), embedded subprocesses, call activities across files (and a
library process calling another), script tasks, user tasks (completed by the
runner, no person needed), intermediate timer events of zero duration, and
DMN business rule tasks; and a file of processes for the constructs those do
not use (:func:`pattern_models`: inclusive and event-based gateways,
multi-instance and loop tasks, cycles of sequence flows, interrupting
boundary events, a terminate end event, an uncontrolled merge).

An order process has 24-29 task specs of its own and 40-60 with the
subprocesses it calls (a refund process 19), about what a hand-drawn business
process has; the generator is deterministic (the same arguments give the same
bytes).

This module imports nothing from SpiffWorkflow; :func:`run_to_end` does, and
drives a workflow to its end without a person: engine steps, user tasks
completed with fixed data, timers refreshed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["generate", "pattern_models", "run_to_end", "final_state", "LIBRARY_PROCESSES", "DECISIONS",
           "PATTERN_PROCESSES"]

_BPMN_HEAD = ('<?xml version="1.0" encoding="UTF-8"?>\n'
              '<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" '
              'xmlns:spiffworkflow="http://spiffworkflow.org/bpmn/schema/1.0/core" '
              'id="{id}" targetNamespace="http://knhk.example/bpmn">\n')
_BPMN_TAIL = "</bpmn:definitions>\n"

LIBRARY_PROCESSES = 6
DECISIONS = 3


class _Proc:
    """A process body under construction: elements and sequence flows."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.parts: list[str] = []
        self.n = 0

    def _id(self, kind: str) -> str:
        self.n += 1
        return f"{self.prefix}{kind}_{self.n}"

    def flow(self, src: str, dst: str, condition: str | None = None) -> str:
        fid = self._id("f")
        if condition is None:
            self.parts.append(f'<bpmn:sequenceFlow id="{fid}" sourceRef="{src}" targetRef="{dst}"/>')
        else:
            self.parts.append(f'<bpmn:sequenceFlow id="{fid}" sourceRef="{src}" targetRef="{dst}">'
                              f'<bpmn:conditionExpression>{escape(condition)}</bpmn:conditionExpression>'
                              '</bpmn:sequenceFlow>')
        return fid

    def element(self, tag: str, kind: str, body: str = "", attrs: str = "", name: str = "") -> str:
        eid = self._id(kind)
        named = f' name="{escape(name)}"' if name else ""
        self.parts.append(f'<bpmn:{tag} id="{eid}"{named}{attrs}>{body}</bpmn:{tag}>')
        return eid

    def script(self, code: str, name: str = "") -> str:
        return self.element("scriptTask", "script", f"<bpmn:script>{escape(code)}</bpmn:script>", name=name)

    def chain(self, start: str, nodes: list[str]) -> str:
        prev = start
        for node in nodes:
            self.flow(prev, node)
            prev = node
        return prev

    def exclusive(self, prev: str, var: str, branches: list[tuple[str | None, list[str]]]) -> str:
        """An exclusive split on ``var`` and its merge; a branch condition of None is the default."""
        split = self._id("xor")
        merge = self._id("xmerge")
        flows = []
        for cond, nodes in branches:
            first = nodes[0]
            fid = self.flow(split, first, cond)
            flows.append((cond, fid))
            last = self.chain(first, nodes[1:])
            self.flow(last, merge)
        default = next((fid for cond, fid in flows if cond is None), None)
        dattr = f' default="{default}"' if default else ""
        self.parts.append(f'<bpmn:exclusiveGateway id="{split}" name="{escape(var)}?"{dattr}/>')
        self.parts.append(f'<bpmn:exclusiveGateway id="{merge}"/>')
        self.flow(prev, split)
        return merge

    def parallel(self, prev: str, branches: list[list[str]]) -> str:
        split = self._id("and")
        join = self._id("join")
        self.parts.append(f'<bpmn:parallelGateway id="{split}"/>')
        self.parts.append(f'<bpmn:parallelGateway id="{join}"/>')
        self.flow(prev, split)
        for nodes in branches:
            self.flow(split, nodes[0])
            last = self.chain(nodes[0], nodes[1:])
            self.flow(last, join)
        return join

    def xml(self) -> str:
        return "\n".join(self.parts)


def _process(pid: str, name: str, body: _Proc) -> str:
    return (f'<bpmn:process id="{pid}" name="{escape(name)}" isExecutable="true">\n'
            f"{body.xml()}\n</bpmn:process>\n")


def _order_process(i: int) -> str:
    p = _Proc(f"o{i}_")
    start = p.element("startEvent", "start")
    items = [(i + k) % 7 for k in range(3 + i % 4)]
    prev = p.chain(start, [p.script(f"amount = {(i * 137) % 900 + 20}\nitems = {items}\n"
                                    f"region = {['eu', 'us', 'apac'][i % 3]!r}\nlog = []", name="Receive order")])
    prev = p.exclusive(prev, "amount", [
        ("amount > 600", [p.script("discount = 0.1\nlog.append('large')", "Large order"),
                          p.script("needs_review = True")]),
        ("amount > 200", [p.script("discount = 0.05\nlog.append('medium')", "Medium order")]),
        (None, [p.script("discount = 0\nlog.append('small')", "Small order")]),
    ])
    width = 2 + i % 3
    branches = []
    for b in range(width):
        chain = [p.script(f"part_{b} = sum(items) * {b + 1}", f"Pick {b}")]
        for extra in range((i + b) % 3):
            chain.append(p.script(f"part_{b} = part_{b} + {extra + 1}", f"Pack {b}.{extra}"))
        branches.append(chain)
    prev = p.parallel(prev, branches)
    prev = p.chain(prev, [p.script("subtotal = " + " + ".join(f"part_{b}" for b in range(width)), "Subtotal")])
    # An embedded subprocess.
    sp = _Proc(f"o{i}_sp_")
    s0 = sp.element("startEvent", "start")
    s_last = sp.chain(s0, [sp.script("tax = round(subtotal * 0.2, 2)", "Tax"),
                           sp.script("shipping = 5 if region == 'eu' else 9", "Shipping")])
    s_last = sp.exclusive(s_last, "region", [
        ("region == 'apac'", [sp.script("shipping = shipping + 3", "Long haul")]),
        (None, [sp.script("log.append('near')", "Near")]),
    ])
    s_end = sp.element("endEvent", "end")
    sp.flow(s_last, s_end)
    sub = p.element("subProcess", "sub", sp.xml(), name="Price")
    prev = p.chain(prev, [sub])
    # A call activity into the library file.
    called = f"lib_{i % LIBRARY_PROCESSES}"
    prev = p.chain(prev, [p.element("callActivity", "call", attrs=f' calledElement="{called}"', name="Check stock")])
    if i % 2 == 0:
        decision = f"tier_{i % DECISIONS}"
        ext = (f"<bpmn:extensionElements><spiffworkflow:calledDecisionId>{decision}"
               "</spiffworkflow:calledDecisionId></bpmn:extensionElements>")
        prev = p.chain(prev, [p.element("businessRuleTask", "rule", ext, name="Customer tier")])
    else:
        prev = p.chain(prev, [p.script("tier = 'standard'", "Default tier")])
    if i % 3 == 0:
        prev = p.chain(prev, [p.element("userTask", "user", name="Approve order"),
                              p.script("log.append('approved' if approved else 'rejected')", "Record approval")])
    if i % 4 == 1:
        timer = ('<bpmn:timerEventDefinition><bpmn:timeDuration>"PT0S"</bpmn:timeDuration>'
                 "</bpmn:timerEventDefinition>")
        prev = p.chain(prev, [p.element("intermediateCatchEvent", "timer", timer, name="Wait for carrier")])
    prev = p.chain(prev, [p.script("total = round(subtotal * (1 - discount) + tax + shipping, 2)\n"
                                   "log.append(tier)", "Total")])
    end = p.element("endEvent", "end")
    p.flow(prev, end)
    return _process(f"order_{i}", f"Order {i}", p)


def _refund_process(i: int) -> str:
    p = _Proc(f"r{i}_")
    start = p.element("startEvent", "start")
    prev = p.chain(start, [p.script(f"refund = {(i * 53) % 300}\nreasons = []", "Open refund")])
    prev = p.exclusive(prev, "refund", [
        ("refund >= 150", [p.script("reasons.append('manager')", "Escalate"),
                           p.element("userTask", "user", name="Manager sign-off")]),
        (None, [p.script("reasons.append('auto')", "Auto approve"), p.script("approved = True")]),
    ])
    prev = p.parallel(prev, [[p.script("ledger = refund * -1", "Ledger")],
                             [p.script("mail = 'sent'", "Notify"), p.script("mail = mail + '!'")]])
    prev = p.chain(prev, [p.element("callActivity", "call",
                                    attrs=f' calledElement="lib_{(i + 3) % LIBRARY_PROCESSES}"', name="Restock")])
    prev = p.chain(prev, [p.script("closed = approved and mail.startswith('sent')", "Close")])
    end = p.element("endEvent", "end")
    p.flow(prev, end)
    return _process(f"refund_{i}", f"Refund {i}", p)


def _library() -> str:
    procs = []
    for k in range(LIBRARY_PROCESSES):
        p = _Proc(f"l{k}_")
        start = p.element("startEvent", "start")
        prev = p.chain(start, [p.script(f"stock_{k} = {k * 11 + 4}", f"Count stock {k}")])
        prev = p.exclusive(prev, f"stock_{k}", [
            (f"stock_{k} > 30", [p.script(f"reserve_{k} = True", "Reserve")]),
            (None, [p.script(f"reserve_{k} = False", "Backorder")]),
        ])
        if k + 1 < LIBRARY_PROCESSES and k % 2 == 0:  # a library process calling another
            prev = p.chain(prev, [p.element("callActivity", "call", attrs=f' calledElement="lib_{k + 1}"',
                                            name="Nested check")])
        end = p.element("endEvent", "end")
        p.flow(prev, end)
        procs.append(_process(f"lib_{k}", f"Library {k}", p))
    return _BPMN_HEAD.format(id="library") + "".join(procs) + _BPMN_TAIL


def _decision(d: int) -> str:
    """One DMN file per decision: SpiffWorkflow reads one decision table a file."""
    out = [('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<definitions xmlns="https://www.omg.org/spec/DMN/20191111/MODEL/" id="tiers_{d}" name="Tiers {d}" '
            'namespace="http://knhk.example/dmn">\n')]
    low, high = 100 + 50 * d, 400 + 100 * d
    # UNIQUE in SpiffWorkflow returns the first rule that matches.
    rules = [(f"&lt; {low}", '"bronze"'), (f"&lt;= {high}", '"silver"'), (f"&gt; {high}", '"gold"')]
    out.append(f'<decision id="tier_{d}" name="Tier {d}">'
               f'<decisionTable id="tier_{d}_table" hitPolicy="UNIQUE">'
               f'<input id="tier_{d}_in" label="Amount"><inputExpression id="tier_{d}_expr" typeRef="integer">'
               '<text>amount</text></inputExpression></input>'
               f'<output id="tier_{d}_out" label="Tier" name="tier" typeRef="string"/>')
    for r, (cond, result) in enumerate(rules):
        out.append(f'<rule id="tier_{d}_r{r}"><inputEntry id="tier_{d}_r{r}_i"><text>{cond}</text></inputEntry>'
                   f'<outputEntry id="tier_{d}_r{r}_o"><text>{result}</text></outputEntry></rule>')
    out.append("</decisionTable></decision>\n")
    out.append("</definitions>\n")
    return "".join(out)


def _timer(duration: str) -> str:
    return (f'<bpmn:timerEventDefinition><bpmn:timeDuration>"{duration}"</bpmn:timeDuration>'
            "</bpmn:timerEventDefinition>")


def _boundary(p: _Proc, attached: str, body: str, interrupting: bool = True) -> str:
    eid = p._id("boundary")
    cancel = "" if interrupting else ' cancelActivity="false"'
    p.parts.append(f'<bpmn:boundaryEvent id="{eid}" attachedToRef="{attached}"{cancel}>{body}</bpmn:boundaryEvent>')
    return eid


def _pattern_processes() -> list[str]:
    """Processes that use what the order models do not: inclusive and
    event-based gateways, multi-instance and loop tasks, cycles of sequence
    flows (structured and with two entries), interrupting boundary events on a
    task and on a subprocess, a terminate end event, an uncontrolled merge. Each
    runs to its end without a person (timers of zero duration win every race;
    messages never arrive)."""
    out = []
    # Inclusive gateway: split (2 of 3 conditions hold) and join.
    p = _Proc("pi_")
    prev = p.chain(p.element("startEvent", "start"), [p.script("a = 5\nseen = []", "Set a")])
    split, join = p._id("or"), p._id("orjoin")
    p.parts.append(f'<bpmn:inclusiveGateway id="{split}"/>')
    p.parts.append(f'<bpmn:inclusiveGateway id="{join}"/>')
    p.flow(prev, split)
    for cond, code in (("a > 1", "x = 1"), ("a > 3", "y = 1"), ("a > 9", "z = 1")):
        t = p.script(code, f"When {cond}")
        p.flow(split, t, cond)
        p.flow(t, join)
    p.flow(p.chain(join, [p.script("done = True", "After the join")]), p.element("endEvent", "end"))
    out.append(_process("pat_inclusive", "Inclusive gateway", p))
    # Event-based gateway: a zero-length timer against a message that never comes.
    p = _Proc("pd_")
    gw = p.element("eventBasedGateway", "evgw")
    p.flow(p.element("startEvent", "start"), gw)
    t = p.element("intermediateCatchEvent", "timer", _timer("PT0S"), name="Zero timer")
    m = p.element("intermediateCatchEvent", "msg", '<bpmn:messageEventDefinition messageRef="knhk_nudge"/>',
                  name="Nudge")
    p.flow(gw, t)
    p.flow(gw, m)
    p.flow(p.chain(t, [p.script("path = 'timer'", "Timer path")]), p.element("endEvent", "end"))
    p.flow(p.chain(m, [p.script("path = 'message'", "Message path")]), p.element("endEvent", "end"))
    out.append(_process("pat_deferred", "Event-based gateway", p))
    # Multiple instances and loops.
    p = _Proc("pm_")
    prev = p.chain(p.element("startEvent", "start"), [p.script("lines = [1, 2, 3]\nk = 0", "Lines")])
    mi = [
        (('<bpmn:multiInstanceLoopCharacteristics><bpmn:loopCardinality>3</bpmn:loopCardinality>'
         "</bpmn:multiInstanceLoopCharacteristics>"), "n = 1", "Three copies"),
        (('<bpmn:multiInstanceLoopCharacteristics><bpmn:loopDataInputRef>lines</bpmn:loopDataInputRef>'
         '<bpmn:loopDataOutputRef>doubled</bpmn:loopDataOutputRef><bpmn:inputDataItem id="line" name="line"/>'
         '<bpmn:outputDataItem id="twice" name="twice"/></bpmn:multiInstanceLoopCharacteristics>'),
         "twice = line * 2", "Each line"),
        (('<bpmn:multiInstanceLoopCharacteristics><bpmn:loopCardinality>len(lines) + 1</bpmn:loopCardinality>'
         "<bpmn:completionCondition>True</bpmn:completionCondition></bpmn:multiInstanceLoopCharacteristics>"),
         "m = 1", "First of several"),
        (('<bpmn:multiInstanceLoopCharacteristics isSequential="true"><bpmn:loopDataInputRef>lines'
         '</bpmn:loopDataInputRef><bpmn:loopDataOutputRef>squares</bpmn:loopDataOutputRef>'
         '<bpmn:inputDataItem id="sline" name="sline"/><bpmn:outputDataItem id="sq" name="sq"/>'
         "</bpmn:multiInstanceLoopCharacteristics>"), "sq = sline * sline", "One line at a time"),
        ('<bpmn:standardLoopCharacteristics loopMaximum="3"/>', "k = k + 1", "Three times"),
    ]
    for loop, code, name in mi:
        prev = p.chain(prev, [p.element("scriptTask", "mi", f"{loop}<bpmn:script>{escape(code)}</bpmn:script>",
                                        name=name)])
    p.flow(prev, p.element("endEvent", "end"))
    out.append(_process("pat_multi", "Multiple instances and loops", p))
    # A structured cycle of sequence flows: one entry, one exit.
    p = _Proc("pc_")
    prev = p.chain(p.element("startEvent", "start"), [p.script("i = 0", "Zero")])
    merge, test = p._id("loopmerge"), p._id("looptest")
    p.parts.append(f'<bpmn:exclusiveGateway id="{merge}"/>')
    p.flow(prev, merge)
    body = p.script("i = i + 1", "Once more")
    p.flow(merge, body)
    end = p.element("endEvent", "end")
    back = p.flow(test, merge, "i < 3")
    out_flow = p.flow(test, end)
    p.parts.append(f'<bpmn:exclusiveGateway id="{test}" default="{out_flow}"/>')
    p.flow(body, test)
    del back
    out.append(_process("pat_cycle", "Structured cycle", p))
    # An arbitrary cycle: entered at two places.
    p = _Proc("pa_")
    prev = p.chain(p.element("startEvent", "start"), [p.script("i = 0\nvisits = []", "Zero")])
    pick, m1, m2, test = p._id("pick"), p._id("m1"), p._id("m2"), p._id("test")
    f_m2 = p.flow(pick, m2)
    p.flow(pick, m1, "i == 0")
    p.parts.append(f'<bpmn:exclusiveGateway id="{pick}" default="{f_m2}"/>')
    p.parts.append(f'<bpmn:exclusiveGateway id="{m1}"/>')
    p.parts.append(f'<bpmn:exclusiveGateway id="{m2}"/>')
    p.flow(prev, pick)
    t1 = p.script("i = i + 1\nvisits.append('a')", "Step A")
    t2 = p.script("i = i + 1\nvisits.append('b')", "Step B")
    p.flow(m1, t1)
    p.flow(t1, m2)
    p.flow(m2, t2)
    p.flow(t2, test)
    end = p.element("endEvent", "end")
    p.flow(test, m1, "i < 4")
    f_out = p.flow(test, end)
    p.parts.append(f'<bpmn:exclusiveGateway id="{test}" default="{f_out}"/>')
    out.append(_process("pat_arbitrary", "Cycle with two entries", p))
    # Interrupting boundary timers: on a task (cancel task), on a subprocess (cancel region).
    p = _Proc("pb_")
    start = p.element("startEvent", "start")
    wait = p.element("receiveTask", "recv", attrs=' messageRef="knhk_never"', name="Wait for a reply")
    p.flow(start, wait)
    b1 = _boundary(p, wait, _timer("PT0S"))
    sp = _Proc("pb_sp_")
    sp.flow(sp.chain(sp.element("startEvent", "start"),
                     [sp.element("receiveTask", "recv", attrs=' messageRef="knhk_never"', name="Wait inside")]),
            sp.element("endEvent", "end"))
    sub = p.element("subProcess", "sub", sp.xml(), name="Region")
    after = p.script("late = True", "Replied in time")
    p.flow(wait, after)
    p.flow(after, sub)
    timed_out = p.script("timed_out = True", "Timed out")
    p.flow(b1, timed_out)
    p.flow(timed_out, sub)
    b2 = _boundary(p, sub, _timer("PT0S"))
    p.flow(sub, p.element("endEvent", "end"))
    p.flow(p.chain(b2, [p.script("region_cancelled = True", "Region cancelled")]), p.element("endEvent", "end"))
    out.append(_process("pat_cancel", "Boundary events", p))
    # A terminate end event cancels the branch still waiting.
    p = _Proc("pt_")
    split = p._id("and")
    p.parts.append(f'<bpmn:parallelGateway id="{split}"/>')
    p.flow(p.element("startEvent", "start"), split)
    a = p.script("finished = True", "Finish")
    p.flow(split, a)
    p.flow(a, p.element("endEvent", "end", "<bpmn:terminateEventDefinition/>", name="Terminate"))
    w = p.element("receiveTask", "recv", attrs=' messageRef="knhk_never"', name="Wait forever")
    p.flow(split, w)
    p.flow(w, p.element("endEvent", "end"))
    out.append(_process("pat_terminate", "Terminate end event", p))
    # Uncontrolled merge: a task with two incoming flows and no gateway (SpiffWorkflow
    # refuses a task with two outgoing flows, so the split is a parallel gateway).
    p = _Proc("pu_")
    fan = p._id("and")
    p.parts.append(f'<bpmn:parallelGateway id="{fan}"/>')
    p.flow(p.chain(p.element("startEvent", "start"), [p.script("hits = 0", "Zero")]), fan)
    left, right = p.script("left = 1", "Left"), p.script("right = 1", "Right")
    p.flow(fan, left)
    p.flow(fan, right)
    both = p.script("hits = hits + 1", "Both arrive")
    p.flow(left, both)
    p.flow(right, both)
    p.flow(both, p.element("endEvent", "end"))
    out.append(_process("pat_uncontrolled", "Uncontrolled flows", p))
    return out


PATTERN_PROCESSES = ("pat_arbitrary", "pat_cancel", "pat_cycle", "pat_deferred", "pat_inclusive", "pat_multi",
                     "pat_terminate", "pat_uncontrolled")


def pattern_models(directory: str | os.PathLike[str]) -> list[str]:
    """Write ``patterns/patterns.bpmn`` under ``directory``: the processes of
    :data:`PATTERN_PROCESSES`, one for each construct the order models do not
    use (see :func:`_pattern_processes`). Returns their ids, sorted."""
    root = Path(directory) / "patterns"
    root.mkdir(parents=True, exist_ok=True)
    messages = ('<bpmn:message id="knhk_nudge" name="nudge"/>\n'
                '<bpmn:message id="knhk_never" name="never"/>\n')
    text = _BPMN_HEAD.format(id="patterns") + messages + "".join(_pattern_processes()) + _BPMN_TAIL
    (root / "patterns.bpmn").write_text(text, encoding="utf-8")
    return sorted(PATTERN_PROCESSES)


def generate(directory: str | os.PathLike[str], *, files: int = 50, patterns: bool = True) -> list[str]:
    """Write ``files`` model files (2 processes each), ``lib/library.bpmn``
    (:data:`LIBRARY_PROCESSES` processes) and ``rules/tier_<n>.dmn``
    (:data:`DECISIONS` decision tables, one a file) under ``directory``.

    With ``patterns`` (the default), also :func:`pattern_models`
    (``patterns/patterns.bpmn``: inclusive and event-based gateways,
    multi-instance and loop tasks, cycles, boundary events, a terminate end
    event, an uncontrolled merge).

    :returns: every executable process id written, sorted (``2 * files +
        LIBRARY_PROCESSES`` of them, plus ``len(PATTERN_PROCESSES)`` with ``patterns``).
    """
    if files < 1:
        raise ValueError(f"files must be >= 1, got {files}")
    root = Path(directory)
    (root / "orders").mkdir(parents=True, exist_ok=True)
    (root / "lib").mkdir(exist_ok=True)
    (root / "rules").mkdir(exist_ok=True)
    ids = []
    for i in range(files):
        text = _BPMN_HEAD.format(id=f"defs_{i}") + _order_process(i) + _refund_process(i) + _BPMN_TAIL
        (root / "orders" / f"order_{i:03d}.bpmn").write_text(text, encoding="utf-8")
        ids += [f"order_{i}", f"refund_{i}"]
    (root / "lib" / "library.bpmn").write_text(_library(), encoding="utf-8")
    for d in range(DECISIONS):
        (root / "rules" / f"tier_{d}.dmn").write_text(_decision(d), encoding="utf-8")
    ids += [f"lib_{k}" for k in range(LIBRARY_PROCESSES)]
    if patterns:
        ids += pattern_models(root)
    return sorted(ids)


def run_to_end(workflow: Any, *, metrics: Any = None, max_rounds: int = 1000) -> Any:
    """Drive a SpiffWorkflow ``BpmnWorkflow`` to completion without a person.

    Engine steps run; each READY user task is given ``approved = True`` and
    completed; waiting timers are refreshed. With ``metrics`` (a
    :class:`knhk_memory.adapters.spiff.TaskMetrics`), every task completion is
    counted and timed. Raises RuntimeError if the workflow is not complete
    after ``max_rounds`` rounds (a model that waits on something the runner
    cannot give).
    """
    from SpiffWorkflow.util.task import TaskState

    will = did = None
    if metrics is not None:
        will, did = metrics.will_complete_task, metrics.did_complete_task
    for _ in range(max_rounds):
        workflow.do_engine_steps(will, did)
        if workflow.completed:
            return workflow
        ready = workflow.get_tasks(state=TaskState.READY, manual=True)
        for task in ready:
            task.data["approved"] = True
            if metrics is not None:
                metrics.run_task(task)
            else:
                task.run()
        workflow.refresh_timers()
    raise RuntimeError(f"workflow {workflow.spec.name!r} did not complete in {max_rounds} rounds")


def final_state(workflow: Any) -> tuple[Any, ...]:
    """What two runs of the same model must agree on: every task's spec name and
    state (in the order SpiffWorkflow lists them), the data of each task, and the
    workflow's data."""
    tasks = []
    for t in workflow.get_tasks():
        tasks.append((t.task_spec.name, t.task_spec.__class__.__name__, t.state, repr(sorted(t.data.items()))))
    return workflow.completed, tasks, repr(sorted(workflow.data.items()))
