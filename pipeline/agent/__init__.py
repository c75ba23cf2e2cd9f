"""The device agent: what runs ON the device.

It is copied into every release as the package ``edgeship_agent`` and must need nothing but the
Python standard library, numpy and the one runtime a run uses. Only relative imports inside this
package; never import ``pipeline``.
"""

AGENT_VERSION = "1"
