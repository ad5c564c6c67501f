"""The `node.meta` keys that analyses and passes read and write, defined in one place."""

#: a :class:`hetegen_fx.linear.LinearSite` on every node that computes a Linear
LINEAR = "hetegen_linear"
#: a :class:`hetegen_fx.profile.LinearCost` written by ProfilePass on every Linear node
COST = "hetegen_cost"
#: the same Linear's cost at one token (a decode step), written by ProfilePass: residency is chosen by it
DECODE_COST = "hetegen_decode_cost"
#: a :class:`hetegen_fx.plan.LayerPlan` written by PlacementPass on every Linear node
PLACEMENT = "hetegen_placement"
#: "cpu" | "gpu" | "copy" | "sync" | "move" | "host": which side a node added by PartitionPass runs on
#: ("host": the launching thread's own work on host tensors, e.g. an embedding lookup from host ids)
SIDE = "hetegen_side"
#: name of the Linear (its weight's qualified name) a partitioned node belongs to
LAYER = "hetegen_layer"
#: byte offset, in the device's staging arena, of the region a copy / wait / release node uses
SLOT = "hetegen_slot"
#: bytes of that region (the GPU part's weight rows)
SLOT_BYTES = "hetegen_slot_bytes"
#: position of a node in the order emitted by SchedulePass
ORDER = "hetegen_order"
#: a :class:`hetegen_fx.linear.ParamRef` on every placeholder / get_attr node bound to a model parameter
PARAM = "hetegen_param"

# graph-level keys (gm.meta)
#: the :class:`hetegen_fx.plan.Plan` of a graph, written by PlacementPass
PLAN = "hetegen_plan"
#: rows (batch × sequence) a Linear multiplies at the graph's example shape, written by ProfilePass
TOKENS = "hetegen_tokens"
#: the :class:`hetegen_fx.costs.HardwareModel` ProfilePass used; PlacementPass takes the job overhead from it
HARDWARE = "hetegen_hardware"

#: graph meta: how the graph uses a KV cache (:class:`hetegen_fx.residency.KVUse`, or None), by PlacementPass
KV_USE = "hetegen_kv_use"
#: graph meta: the model's first memory ledger and its reserves, ``(Ledger, dict)``, placed by PlacementPass in
#: a model's first graph; the pipeline gives them to the weight store (:func:`hetegen_fx.pipeline.transform`)
LEDGER = "hetegen_ledger"
#: graph meta: Linear name → the tensors it is made of (weight, bias), by PlacementPass: what a residency
#: change moves (the pipeline gives them to the weight store)
TENSORS = "hetegen_tensors"
#: graph meta: the storage tier's read costs measured by ProfilePass where Linear weights stay in their
#: checkpoint (:func:`hetegen_fx.prefetch.measure_reads`): ``{"read_rate": bytes/s, "read_latency": s}``
STORAGE_COST = "hetegen_storage_cost"
#: graph meta: the model's first storage-tier decision, by PlacementPass: Linear name → rows kept in RAM
#: (the rest stay in storage); the pipeline gives it to the weight store
HOST_ROWS = "hetegen_host_rows"
