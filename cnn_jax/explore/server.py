"""Starting the explorer: checks first, then compile, then serve.

Everything that can fail on a user's mistake (a missing or invalid workdir,
a ``--compare`` run on another dataset, a port in use, an unwritable
workdir) fails before serving, as one `CnnJaxError`. The page is served on
127.0.0.1 unless another host is given, and it works offline: Gradio's
analytics and the Hugging Face hub are off, and every script, style and font
comes from the local server. It writes only to ``WORKDIR/explore/``
(uploaded files, kept by Gradio, and matplotlib's settings), which is
removed when it stops, besides JAX's compilation cache that every mode uses
(``--nocompilation_cache`` turns it off). Ctrl-C (or SIGTERM) stops it
cleanly.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any

from absl import logging

from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, CnnJaxError

SCRATCH = 'explore'
SCRATCH_PARTS = ('uploads', 'matplotlib')
# Ctrl-C waits this long for Gradio's server to finish its open requests.
CLOSE_SECONDS = 20.0


def check_port(host: str, port: int) -> None:
  """Fails unless ``host:port`` can be listened on now."""
  if not 0 < port < 65536:
    raise CnnJaxError(f'--port must be between 1 and 65535, got {port}')
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise CnnJaxError(f'--host={host} is not an address of this machine '
                      f'({e.strerror})') from e
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As uvicorn.
    try:
      s.bind(address)
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise CnnJaxError(f'port {port} on {host} is in use; stop what '
                          'serves it or pick another with --port') from e
      raise CnnJaxError(f'cannot listen on {host}:{port}: '
                        f'{e.strerror or e}') from e


def _label(config: Config) -> str:
  if config.members:
    return 'ensemble'
  if config.num_models > 1:
    return f'{config.model} ×{config.num_models}'
  return config.model


def load_explorer(config: Config, workdir: str, compare: str | None
                  ) -> Any:
  """The `Explorer` of ``workdir`` (and ``compare``), compiled, and the
  runs' labels. Raises CnnJaxError for a workdir or ``compare`` run that
  cannot be served."""
  import jax
  from cnn_jax.analysis import compare as compare_lib
  from cnn_jax.explore import networks, panels
  info = workdir_lib.dataset_info(workdir, config)
  other = compare_lib.other_config(compare, info) if compare else None
  devices = jax.devices()
  runs = [networks.load(workdir, config, devices[0])]
  if other is None:
    return panels.Explorer(runs), [
        f'{_label(config)} ({os.path.normpath(workdir)})']
  try:
    runs.append(networks.load(compare, other, devices[1 % len(devices)]))
  except CnnJaxError as e:
    raise CnnJaxError(f'--compare={compare}: {e}') from e
  return panels.Explorer(runs), list(compare_lib.labels(
      _label(config), workdir, _label(other), compare))


def _scratch_dir(workdir: str) -> str:
  """``WORKDIR/explore``: the only folder the explorer writes to
  (Gradio's uploads, matplotlib's settings); `_remove` empties it."""
  workdir_lib.require_run(workdir)
  path = os.path.abspath(os.path.join(workdir, SCRATCH))
  try:
    for sub in SCRATCH_PARTS:
      os.makedirs(os.path.join(path, sub), exist_ok=True)
  except OSError as e:
    raise CnnJaxError(f'cannot write {path} (uploads are kept there while '
                      f'the page is served): {e.strerror or e}') from e
  return path


def _remove(scratch: str) -> None:
  """Deletes what the explorer wrote, and ``scratch`` once empty."""
  for sub in SCRATCH_PARTS:
    shutil.rmtree(os.path.join(scratch, sub), ignore_errors=True)
  try:
    os.rmdir(scratch)
  except OSError:
    pass


def _environment(scratch: str) -> None:
  """Offline, and writing to ``scratch`` only; read by Gradio,
  huggingface_hub and matplotlib when they are first imported."""
  os.environ['GRADIO_TEMP_DIR'] = os.path.join(scratch, 'uploads')
  os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'
  os.environ['HF_HUB_OFFLINE'] = '1'
  os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'
  os.environ['MPLCONFIGDIR'] = os.path.join(scratch, 'matplotlib')


def serve(config: Config, workdir: str, compare: str | None = None,
          host: str = '127.0.0.1', port: int = 7860) -> int:
  """Serves the explorer of ``workdir`` until Ctrl-C; returns 0.

  Raises CnnJaxError before serving for any problem with the arguments.
  """
  if importlib.util.find_spec('gradio') is None:
    raise CnnJaxError('--mode=explore needs Gradio: pip install -e '
                      '".[explore]"')
  if {'gradio', 'matplotlib'} & set(sys.modules):
    raise CnnJaxError('the explorer must set up Gradio itself; start it '
                      'with --mode=explore in a fresh process')
  check_port(host, port)
  scratch = _scratch_dir(workdir)
  try:
    _environment(scratch)
    started = time.perf_counter()
    explorer, labels = load_explorer(config, workdir, compare)
    logging.info('restored and compiled in %.1fs',
                 time.perf_counter() - started)
    from cnn_jax.explore import app, page, panels
    title = 'cnn_jax explorer: ' + ' vs '.join(labels)
    demo = app.build(explorer, labels, title)
    try:
      demo.launch(server_name=host, server_port=port,
                  prevent_thread_lock=True, quiet=True, ssr_mode=False,
                  footer_links=[],
                  max_file_size=panels.MAX_UPLOAD_BYTES,
                  show_error=False, state_session_capacity=256,
                  run_history=False, pwa=False, mcp_server=False,
                  css=page.static('explore.css'))
    except OSError as e:
      raise CnnJaxError(f'cannot serve on {host}:{port}: {e}') from e
    shown = f'[{host}]' if ':' in host else host
    print(f'explorer of {workdir} at http://{shown}:{port}/ '
          '(Ctrl-C to stop)', flush=True)
    # SIGINT too: Python leaves Ctrl-C ignored in a process started with it
    # ignored (a shell's background job), and the explorer must still stop.
    previous = {s: signal.signal(s, _interrupt)
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      while True:
        time.sleep(0.5)
    except KeyboardInterrupt:
      pass
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
      _close(demo)
  finally:
    _remove(scratch)
  print('explorer stopped', flush=True)
  return 0


def _close(demo: Any) -> None:
  """Closes the Gradio app, giving up after `CLOSE_SECONDS`: a request
  still open (a slow client, a loaded CPU) must not keep Ctrl-C from
  stopping the explorer. The process exits right after, ending it."""
  closer = threading.Thread(target=demo.close, daemon=True)
  closer.start()
  closer.join(CLOSE_SECONDS)
  if closer.is_alive():
    logging.warning('the web server did not close within %.0fs; stopping '
                    'without it', CLOSE_SECONDS)


def _interrupt(signum: int, frame: Any) -> None:
  del signum, frame
  raise KeyboardInterrupt
