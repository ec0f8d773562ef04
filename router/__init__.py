"""The inference router. Importing the package first installs the finder that picks the build
(router/core/build.py): the compiled extension modules, or the sources when ROUTER_PURE=1."""

from router.core import build as _build

_build.install()
