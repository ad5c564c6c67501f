"""The hetegen_fx passes, one per file, each a ``torch.fx.passes.infra`` pass returning a PassResult.

Order: (StageSplitPass, for a pipeline stage) → ProfilePass → PlacementPass → PartitionPass → DevicePass →
SchedulePass (see hetegen_fx.pipeline).
"""

from .device import DevicePass
from .partition import PartitionPass
from .placement import PlacementPass
from .profile import ProfilePass
from .schedule import SchedulePass
from .stages import StageSplitPass

__all__ = ["DevicePass", "PartitionPass", "PlacementPass", "ProfilePass", "SchedulePass", "StageSplitPass"]
