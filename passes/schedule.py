"""SchedulePass: order the partitioned graph so copies are issued early and overlap CPU work.

The graph becomes a networkx DAG: data edges, ordering edges around ops that mutate their inputs
(``wait_copy`` before, ``release_slot`` after, the GPU part that reads the staged weight), and staging
edges — a copy into a region of the staging arena comes after the release of every earlier GPU part that
read any of its bytes. A lexicographic topological sort then emits every copy as soon as its region is free
(prefetching as many Linears ahead as the arena holds: ``prefetch`` consecutive GPU parts)
and everything else in the original order (``cpu_wait`` stays after every CPU job and before the outputs'
moves; a CPU job's ``cpu_end``, where the compute stream waits for the
CPU, stays after the GPU parts PartitionPass queued before it). The emitted order is verified topological.
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from hetegen_fx import meta
from hetegen_fx.graph_utils import schema_writes
from hetegen_fx.ops import COPY, CPU_END, CPU_WAIT, RELEASE, is_op


def build_dag(graph: fx.Graph) -> nx.DiGraph:
    """Dependencies of ``graph``: data, mutation order and staging-slot reuse."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    dag = nx.DiGraph()
    for n in graph.nodes:
        dag.add_node(n)
        for inp in n.all_input_nodes:
            dag.add_edge(inp, n, kind="data")
    for n in graph.nodes:
        for arg in schema_writes(n):
            for user in arg.users:
                if user is n:
                    continue
                a, b = (user, n) if index[user] < index[n] else (n, user)
                dag.add_edge(a, b, kind="mutation")
    releases: list[tuple[int, int, fx.Node]] = []  # (start, end, release) of the staging regions so far
    for n in graph.nodes:
        if n.op != "call_function" or meta.SLOT not in n.meta:
            continue
        start = n.meta[meta.SLOT]
        end = start + n.meta[meta.SLOT_BYTES]
        if is_op(n.target, COPY):
            for a, b, release in releases:
                if a < end and start < b:  # the copy overwrites bytes an earlier GPU part read
                    dag.add_edge(release, n, kind="staging")
        elif is_op(n.target, RELEASE):
            releases.append((start, end, n))
    for n in graph.nodes:  # the wait for all CPU jobs stays put: after every job, before what follows it
        if n.op != "call_function" or not is_op(n.target, CPU_WAIT):
            continue
        for m in graph.nodes:
            if m.op == "call_function" and is_op(m.target, CPU_END):
                dag.add_edge(m, n, kind="barrier")
            elif index[m] > index[n]:
                dag.add_edge(n, m, kind="barrier")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for a, b in zip(placeholders, placeholders[1:], strict=False):
        dag.add_edge(a, b, kind="signature")
    out = graph.output_node()
    for n in graph.nodes:
        if n is not out and not dag.has_edge(n, out):
            dag.add_edge(n, out, kind="last")
    return dag


def is_topological(order: list[fx.Node], dag: nx.DiGraph) -> bool:
    pos = {n: i for i, n in enumerate(order)}
    return len(pos) == dag.number_of_nodes() and all(pos[a] < pos[b] for a, b in dag.edges)


class SchedulePass(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        dag = build_dag(graph)

        def key(n: fx.Node) -> tuple[int, int]:
            if n.op == "placeholder":
                return (0, index[n])
            early = n.meta.get(meta.SIDE) == "copy"  # copies and the host weights they read
            return (1 if early else 2, index[n])

        order = list(nx.lexicographical_topological_sort(dag, key=key))
        if not is_topological(order, dag):
            raise AssertionError("SchedulePass produced an order that breaks a dependency")
        modified = order != nodes
        if modified:
            out = graph.output_node()
            for n in order:
                if n is not out:
                    out.prepend(n)
        for i, n in enumerate(graph.nodes):
            n.meta[meta.ORDER] = i
        graph.lint()
        return PassResult(gm, modified)
