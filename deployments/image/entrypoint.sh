#!/bin/sh
# nodewise's entry point in its image: run the command given (nodewise ..., python -m serving...,
# ray start ..., mpirun ...). `sshd` as the command runs an MPIJob worker's ssh daemon in the
# foreground on port 2222 as this (non-root) user, the MPI Operator's convention: the operator
# mounts its key pair and authorized_keys at sshAuthMountPath (~/.ssh), and the key doubles as
# the host key; without a mounted key (a test run) a host key is made in ~/.sshd.
set -e
if [ "$1" = "sshd" ]; then
    shift
    state="$HOME/.sshd"
    mkdir -p "$state"
    key="$HOME/.ssh/id_rsa"
    if [ ! -f "$key" ]; then
        key="$state/host_ed25519"
        [ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -f "$key"
    fi
    exec /usr/sbin/sshd -D -e -p 2222 -h "$key" -o PidFile="$state/sshd.pid" -o StrictModes=no \
        -o PasswordAuthentication=no "$@"
fi
exec "$@"
