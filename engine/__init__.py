"""The study engine: cached stages planned, run here or on Ray, scheduled critical path first,
with their progress and honest times. It knows stages (`engine.stage.Stage`: a name, a config, a
function, its upstream stages), never the experiments: `study` hands it its catalogue, and the
import contract in pyproject.toml keeps it from importing any experiment."""
