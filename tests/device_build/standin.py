"""STAND-INS for NVIDIA TensorRT, its ``trtexec`` and the CUDA driver's device query (tests only).

TensorRT cannot run on these machines (no GPU, no TensorRT). The device-side build's
orchestration (flags, workspace, DLA core, batch profile, the engine cache and its key, the
inspector's per-layer precision, the build log, the failure reasons) is tested against these:
a fake ``tensorrt`` package offering exactly the calls pipeline/agent/trt_build.py makes, a fake
``trtexec`` script and a fake ``libcuda.so.1`` (four driver calls). Each is written into a test's
tmp folder and put on the agent's PYTHONPATH / PATH / LD_LIBRARY_PATH; every builder call is
appended as JSON to ``$STANDIN_TRT_RECORD`` so tests can see what the agent asked for. The real
engine build is tests/tensorrt (runs where TensorRT and a GPU exist).
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

STANDIN_GPU = "Stand-in Orin (nvgpu)"
STANDIN_CC = "8.7"

TENSORRT_PY = textwrap.dedent('''
    """STAND-IN for NVIDIA TensorRT (edgeship tests only): records calls, builds fake engines."""
    import hashlib, json, os

    __version__ = os.environ.get("STANDIN_TRT_VERSION", "10.3.0.26")


    def _record(event, **data):
        path = os.environ.get("STANDIN_TRT_RECORD")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(dict(data, event=event)) + "\\n")


    class _Sev:
        def __init__(self, name):
            self.name = name


    class ILogger:
        INFO, WARNING, ERROR, VERBOSE = _Sev("INFO"), _Sev("WARNING"), _Sev("ERROR"), _Sev("VERBOSE")

        def __init__(self):
            pass


    class Logger(ILogger):
        def __init__(self, level=None):
            pass

        def log(self, severity, msg):
            pass


    class NetworkDefinitionCreationFlag:
        EXPLICIT_BATCH = 0


    class BuilderFlag:
        FP16, INT8, GPU_FALLBACK = "FP16", "INT8", "GPU_FALLBACK"


    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"


    class DeviceType:
        GPU, DLA = "GPU", "DLA"


    class ProfilingVerbosity:
        DETAILED = "DETAILED"


    class LayerInformationFormat:
        JSON = "JSON"


    class _Input:
        def __init__(self, name, shape):
            self.name, self.shape = name, tuple(shape)


    class _Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]


    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            import onnx
            try:
                graph = onnx.load(path).graph
            except Exception as exc:
                self.errors.append("stand-in parser: %s" % exc)
                return False
            inits = {t.name for t in graph.initializer}
            for i in graph.input:
                if i.name not in inits:
                    dims = [d.dim_value if d.dim_value else -1 for d in i.type.tensor_type.shape.dim]
                    self.network.inputs.append(_Input(i.name, dims))
            _record("parse", path=path, sha256=hashlib.sha256(open(path, "rb").read()).hexdigest())
            return True


    class _Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]


    class _Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = [], {}, []
            self.profiling_verbosity = None
            self.default_device_type = DeviceType.GPU
            self.DLA_core = -1

        def set_flag(self, flag):
            self.flags.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)


    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return _Network()

        def create_builder_config(self):
            return _Config()

        def create_optimization_profile(self):
            return _Profile()

        def build_serialized_network(self, network, config):
            desc = {"flags": sorted(config.flags), "pools": config.pools, "profiles": config.profiles,
                    "device": config.default_device_type, "dla_core": config.DLA_core,
                    "verbosity": config.profiling_verbosity, "inputs": [i.name for i in network.inputs]}
            _record("build", **desc)
            self.logger.log(ILogger.INFO, "stand-in builder: engine built")
            return ("STAND-IN ENGINE " + json.dumps(desc, sort_keys=True)).encode()


    class _Inspector:
        def __init__(self, desc):
            self.desc = desc

        def get_engine_information(self, fmt):
            kind = "Int8" if "INT8" in self.desc["flags"] else "Half" if "FP16" in self.desc["flags"] else "FP32"
            layers = [{"Name": "conv%d" % i, "LayerType": "CaskConvolution",
                       "Outputs": [{"Format/Datatype": "Row major linear " + kind}]} for i in range(2)]
            return json.dumps({"Layers": layers, "Bindings": self.desc["inputs"]})


    class _Engine:
        def __init__(self, data):
            self.desc = json.loads(bytes(data).decode().split(" ", 2)[2])

        def create_engine_inspector(self):
            return _Inspector(self.desc)


    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _Engine(data)
''')

TRTEXEC = textwrap.dedent('''\
    #!/usr/bin/env python3
    """STAND-IN for NVIDIA trtexec (edgeship tests only): records argv, writes a fake engine."""
    import json, os, sys
    print("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # " + " ".join(sys.argv))
    if "--help" in sys.argv:
        sys.exit(0)
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    with open(os.environ["STANDIN_TRT_RECORD"], "a") as fh:
        fh.write(json.dumps({"event": "trtexec", "argv": sys.argv[1:]}) + "\\n")
    open(args["saveEngine"], "wb").write(b"STAND-IN TRTEXEC ENGINE")
    kind = "Int8" if "--int8" in sys.argv else "Half" if "--fp16" in sys.argv else "FP32"
    json.dump({"Layers": [{"Name": "conv", "LayerType": "CaskConvolution",
                           "Outputs": [{"Format/Datatype": "Channel major " + kind}]}]},
              open(args["exportLayerInfo"], "w"))
    print("&&&& PASSED TensorRT.trtexec")
''')

LIBCUDA_C = textwrap.dedent(f'''
    /* STAND-IN for the CUDA driver (edgeship tests only): the four calls of the device query. */
    #include <string.h>
    int cuInit(unsigned int flags) {{ return 0; }}
    int cuDeviceGet(int *dev, int ordinal) {{ *dev = 0; return 0; }}
    int cuDeviceGetName(char *name, int len, int dev) {{ strncpy(name, "{STANDIN_GPU}", len); return 0; }}
    int cuDeviceGetAttribute(int *v, int attr, int dev) {{
        *v = attr == 75 ? {STANDIN_CC.split(".")[0]} : {STANDIN_CC.split(".")[1]}; return 0; }}
''')


def write_tensorrt(folder: Path) -> Path:
    """``folder/tensorrt/__init__.py`` (the stand-in package); returns ``folder`` for PYTHONPATH."""
    (folder / "tensorrt").mkdir(parents=True, exist_ok=True)
    (folder / "tensorrt" / "__init__.py").write_text(TENSORRT_PY)
    return folder


def write_trtexec(folder: Path) -> Path:
    """``folder/trtexec`` (executable stand-in); returns ``folder`` for PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trtexec").write_text(TRTEXEC)
    (folder / "trtexec").chmod(0o755)
    return folder


def write_libcuda(folder: Path) -> Path | None:
    """``folder/libcuda.so.1`` compiled from the stand-in source; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "standin_cuda.c").write_text(LIBCUDA_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(folder / "standin_cuda.c")],
                   check=True, capture_output=True)
    return folder
