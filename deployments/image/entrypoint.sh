#!/bin/sh
# nodewise's entry point in its image: run the command given (nodewise ..., python -m serving...,
# ray start ..., mpirun ...). `sshd` as the command runs an MPIJob worker's ssh daemon in the
# foreground on port 2222 as this (non-root) user, the MPI Operator's convention: the operator
# mounts its key pair and authorized_keys at sshAuthMountPath (~/.ssh), and the key doubles as
# the host key; without a mounted key (a test run) a host key is made in ~/.sshd.
#
# Ranks that mpirun starts over ssh would see sshd's bare session environment, not the pod's:
# no TORCH_EXTENSIONS_DIR (so every rank rebuilt DeepSpeed's op, ~70 s), none of the image's
# settings, none of the variables the pod takes from its Secret. sshd's own SetEnv hands the
# pod's environment to every session; it goes in a config file only this user reads, not on a
# command line that `ps` shows.
set -e
if [ "$1" = "sshd" ]; then
    shift
    state="$HOME/.sshd"
    mkdir -p "$state"
    chmod 700 "$state"
    key="$HOME/.ssh/id_rsa"
    if [ ! -f "$key" ]; then
        key="$state/host_ed25519"
        [ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -f "$key"
    fi
    umask 077
    python3 - "$state/sshd_config" "$key" "$state" <<'PY'
import os, sys

config, key, state = sys.argv[1:4]
session = {"HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "TERM", "MAIL", "_"}
passed = []
for name, value in sorted(os.environ.items()):
    if name in session:
        continue
    if not name.replace("_", "a").isalnum() or any(c in value for c in '"\n\r'):
        print(f"nodewise-entrypoint: {name} is not passed to ssh sessions (a quote or newline in it)", file=sys.stderr)
        continue
    passed.append(f'"{name}={value}"')
with open(config, "w") as out:
    out.write(f"Port 2222\nHostKey {key}\nPidFile {state}/sshd.pid\nStrictModes no\n")
    out.write("PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\n")
    out.write("AuthorizedKeysFile .ssh/authorized_keys\n")
    if passed:
        out.write("SetEnv " + " ".join(passed) + "\n")
PY
    exec /usr/sbin/sshd -D -e -f "$state/sshd_config" "$@"
fi
exec "$@"
