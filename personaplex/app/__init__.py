"""The application layer: what every command shares, below all of them.

``flags.py`` declares the model and sampling flags, ``model.py`` turns them into a loaded model and sampling
settings, ``recordings.py`` runs recordings through the engine (``personaplex offline``, ``personaplex eval fdb
run``), ``console.py`` logs and turns a user-facing error into one line and an exit status. Commands
(``offline``, ``server.serve``, ``client``, ``loadtest``, ``scaleout.cli``, ``eval.cli``) and the conversation hub
build on it; nothing here imports a command.
"""
