#!/bin/sh
# nodewise's entry point in its image: run the command given (nodewise ..., python -m serving...,
# ray start ..., mpirun ...). `sshd` as the command starts the MPIJob worker's ssh daemon in the
# foreground on port 2222 (non-root: the MPI Operator's launcher connects as this user, with the
# key the operator mounts).
set -e
if [ "$1" = "sshd" ]; then
    shift
    keys="$HOME/.sshd"
    mkdir -p "$keys"
    [ -f "$keys/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$keys/host_ed25519"
    exec /usr/sbin/sshd -D -e -p 2222 -h "$keys/host_ed25519" \
        -o PidFile="$keys/sshd.pid" -o StrictModes=no -o PasswordAuthentication=no "$@"
fi
exec "$@"
