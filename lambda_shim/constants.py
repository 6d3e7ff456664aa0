"""mpi4py's constants, operators and ``Status`` for communicators that are not mpi4py
(``SelfComm``, ``TcpComm``), with MPICH's values, so code written against either behaves
the same. Nothing here imports the rest of cai_hpc: the communicator core stands alone."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ANY_SOURCE = -2  # MPICH's MPI_ANY_SOURCE
ANY_TAG = -1  # MPICH's MPI_ANY_TAG
PROC_NULL = -1  # MPICH's MPI_PROC_NULL: sends to it vanish, receives from it return None
IN_PLACE = object()  # stands for mpi4py's MPI.IN_PLACE in the buffer forms


@dataclass(frozen=True)
class Op:
    """A reduction operator: ``fn`` folds two Python objects, ``ufunc`` two arrays."""

    name: str
    fn: Callable[[Any, Any], Any]
    ufunc: np.ufunc

    def __call__(self, a: Any, b: Any) -> Any:
        return self.fn(a, b)


SUM = Op("SUM", operator.add, np.add)
PROD = Op("PROD", operator.mul, np.multiply)
MAX = Op("MAX", max, np.maximum)
MIN = Op("MIN", min, np.minimum)


class Status:
    """Filled by ``recv(status=...)`` with the matched message's source and tag."""

    def __init__(self) -> None:
        self.source = ANY_SOURCE
        self.tag = ANY_TAG

    def Get_source(self) -> int:  # noqa: N802 - mpi4py's name
        return self.source

    def Get_tag(self) -> int:  # noqa: N802 - mpi4py's name
        return self.tag


def buffer_array(buf: Any) -> np.ndarray:
    """The array of an mpi4py buffer spec: ``arr``, ``[arr, counts]`` or ``[arr, counts, displs, type]``."""
    return buf[0] if isinstance(buf, (list, tuple)) else buf
