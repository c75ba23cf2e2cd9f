"""ncnn backend (pnnx converter, edgeship-written INT8); see convert.py."""
