"""The server's adapter registry: which adapters can be served, which are resident, and which to evict.

An adapter is servable when it is resident (in `model.adapters`), when the registry knows the file it came from
(`serve --adapter NAME=FILE`, POST /v1/adapters), or when `DIR/NAME.safetensors` exists in the adapter directory
(`serve --adapter-dir DIR`). A servable adapter that is not resident is loaded on its first request: the file is
read and checked in a worker thread, outside the engine's model lock (decoding goes on), and registered under the
lock, between two decode steps.

With `max_adapters` N, at most N reloadable adapters (those with a known file) stay resident: past N, the least
recently used one that no request holds or has queued or decoding is evicted, together with its cached prompt K/V
(`Engine.forget_adapter`). One in use is never evicted, so N is exceeded while more than N are in use at once.
Adapters put on the model without a file (in Python, before the server started) cannot be reloaded and are
never evicted nor counted.

Names are ids, never paths (`adapter_file.check_adapter_name`); a file is found only as `DIR/NAME.safetensors`
whose real path lies inside DIR, so '..', absolute paths and symlinks out of DIR are not servable.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from llama_adapter.adapter_file import ADAPTER_NAME, build_adapter, check_adapter_name
from llama_adapter.errors import AdapterError, TemplateError
from llama_adapter.model import Transformer
from llama_adapter.prompting import resolve_template
from llama_adapter.serving.engine import Engine

log = logging.getLogger("llama_adapter.serving.registry")
SUFFIX = ".safetensors"


class AdapterRegistry:
    """The servable adapters of one model and engine; thread-safe (the event loop and worker threads use it)."""

    def __init__(
        self,
        model: Transformer,
        engine: Engine,
        directory: str | Path | None = None,
        max_adapters: int | None = None,
    ) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise AdapterError("--max-adapters must be >= 1")
        self.model, self.engine, self.max_adapters = model, engine, max_adapters
        self.directory = Path(directory).resolve() if directory is not None else None
        if self.directory is not None and not self.directory.is_dir():
            raise AdapterError(f"{directory}: adapter directory not found")
        self._files: dict[str, Path] = {}  # adapters loaded from a file given by path (reloadable after eviction)
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident reloadable adapters, least recently used first
        self._users: Counter[str] = Counter()  # requests between `acquire` and their hand-over to the engine
        self._lock = threading.Lock()  # _files, _lru, _users; taken inside the model lock, never around it
        self.loads = 0
        self.evictions = 0

    # ---- names ---------------------------------------------------------------------------------------------
    def directory_names(self) -> list[str]:
        """Stems of the adapter directory's servable files, sorted (left out: a stem that is no valid name, a
        symlink out of the directory)."""
        if self.directory is None:
            return []
        stems = (p.stem for p in self.directory.glob("*" + SUFFIX) if ADAPTER_NAME.fullmatch(p.stem))
        return sorted(n for n in stems if self._in_directory(n) is not None)

    def check_directory(self) -> None:
        """AdapterError naming the first file of the directory whose stem cannot be an adapter name."""
        if self.directory is None:
            return
        for p in sorted(self.directory.glob("*" + SUFFIX)):
            try:
                check_adapter_name(p.stem)
            except AdapterError as e:
                raise AdapterError(f"{p}: {e}; rename the file") from None

    def path_of(self, name: str) -> Path | None:
        """The file adapter `name` is loaded from, or None: a remembered file, else `DIR/NAME.safetensors` when
        `name` is a valid name and the file's real path is inside DIR."""
        with self._lock:
            known = self._files.get(name)
        return known if known is not None else self._in_directory(name)

    def _in_directory(self, name: str) -> Path | None:
        if self.directory is None or not ADAPTER_NAME.fullmatch(name):
            return None
        path = self.directory / (name + SUFFIX)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.directory) or not real.is_file():
            return None
        return path

    def names(self) -> list[str]:
        """Every servable adapter: the resident ones, then the others (remembered files, the directory's)."""
        resident = list(self.model.adapters)
        with self._lock:
            files = list(self._files)
        others = [n for n in (*files, *self.directory_names()) if n not in resident]
        return resident + list(dict.fromkeys(others))

    def resident(self) -> set[str]:
        return set(self.model.adapters)

    def remember(self, name: str, path: str | Path) -> None:
        """Record the file of an adapter already loaded from it (`serve --adapter NAME=FILE`): it becomes
        evictable and is reloaded from `path` when asked for again."""
        with self._lock:
            self._files[name] = Path(path)
            if name in self.model.adapters:
                self._lru[name] = None

    # ---- use -----------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> bool:
        """Hold resident adapter `name` against eviction until `release` (False: not resident)."""
        with self._lock:
            if name not in self.model.adapters:
                return False
            self._users[name] += 1
            if name in self._lru:
                self._lru.move_to_end(name)
            return True

    def release(self, name: str) -> None:
        with self._lock:
            self._users[name] -= 1
            if self._users[name] <= 0:
                del self._users[name]

    def ensure(self, name: str) -> bool:
        """`acquire` adapter `name`, loading it from its file first if it is not resident (blocking: call it from a
        worker thread). False when no such adapter is servable; AdapterError when its file cannot be used."""
        if self.acquire(name):
            return True
        path = self.path_of(name)
        if path is None:
            return False
        self._register(name, path, hold=True)
        return True

    # ---- load / unload -------------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> None:
        """Load the file `path` as a new adapter `name` and remember it (POST /v1/adapters); blocking."""
        self._register(name, Path(path), hold=False, remember=True)

    def _register(self, name: str, path: Path, hold: bool, remember: bool = False) -> None:
        adapter = build_adapter(self.model, path)  # the slow, failing part: outside the lock, nothing registered
        with self.engine.model_lock():
            if name not in self.model.adapters:  # (else another request loaded it meanwhile)
                self.model.adapters[name] = adapter
                try:  # its prompt format must be one this base can give ("chat" needs a chat template)
                    resolve_template(self.model, name)
                except TemplateError as e:
                    del self.model.adapters[name]
                    raise AdapterError(f"{path}: {e}") from None
                self.engine.forget_adapter(name)
                self.loads += 1
                log.info("loaded adapter %r from %s", name, path)
            with self._lock:
                if remember:
                    self._files[name] = path
                self._lru[name] = None
                self._lru.move_to_end(name)
                if hold:
                    self._users[name] += 1
            self.evict_over_limit()

    def over_limit(self) -> bool:
        """More than `max_adapters` reloadable adapters resident (left so while they were all in use)."""
        if self.max_adapters is None:
            return False
        with self._lock:
            return sum(n in self.model.adapters for n in self._lru) > self.max_adapters

    def evict_over_limit(self) -> None:
        """Evict least recently used idle adapters while more than `max_adapters` are resident (blocking: takes the
        model lock, so it waits for the engine's current step)."""
        if self.max_adapters is None:
            return
        with self.engine.model_lock():
            self._evict_locked(self.max_adapters)

    def _evict_locked(self, limit: int) -> None:
        evicted = []
        with self._lock:
            busy = self.engine.adapters_in_use() | set(self._users)
            resident = [n for n in self._lru if n in self.model.adapters]
            over = len(resident) - limit
            for n in resident:
                if over <= 0:
                    break
                if n in busy:
                    continue
                del self.model.adapters[n]
                del self._lru[n]
                evicted.append(n)
                over -= 1
        for n in evicted:
            self.engine.forget_adapter(n)
            self.evictions += 1
            log.info("evicted adapter %r (least recently used, over --max-adapters %d)", n, limit)

    def remove(self, name: str) -> bool:
        """Unload adapter `name` (False: not resident). Requests decoding with it finish; queued ones fail with
        "no adapter named". A file given by path is forgotten; one in the directory stays servable."""
        with self.engine.model_lock():
            if name not in self.model.adapters:
                return False
            del self.model.adapters[name]
            with self._lock:
                self._lru.pop(name, None)
                self._files.pop(name, None)
            self.engine.forget_adapter(name)
            return True
