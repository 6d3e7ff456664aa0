#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and CI (Debian's slurm-wlm + munge).
#
#   slurm/local-cluster.sh start [STATE_DIR]   # prints: export SLURM_CONF=STATE_DIR/slurm.conf
#   slurm/local-cluster.sh stop  [STATE_DIR]
#
# Needs root (SlurmUser=root) and the packages slurmd slurmctld slurm-client munge.
# Everything it writes lives in STATE_DIR (default /tmp/cai-hpc-slurm), except the munge key.
set -euo pipefail

action=${1:?usage: local-cluster.sh start|stop [STATE_DIR]}
state=${2:-/tmp/cai-hpc-slurm}
node=$(hostname -s)

stop() {
    for pid in "$state/slurmd.pid" "$state/slurmctld.pid"; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi
[ "$action" = start ] || { echo "usage: local-cluster.sh start|stop [STATE_DIR]" >&2; exit 2; }

for bin in munged slurmctld slurmd sbatch; do
    command -v "$bin" >/dev/null || { echo "local-cluster.sh: $bin not found (apt-get install slurmd slurmctld slurm-client munge)" >&2; exit 3; }
done

# munge: a locally made key, the daemon run as root.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
if ! pgrep -x munged >/dev/null; then
    munged --force
fi

stop
mkdir -p "$state/ctld" "$state/spool"
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$state/slurm.conf" <<CONF
ClusterName=caihpc
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$state/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"

# Ready when the node takes jobs (bounded wait).
for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "local-cluster.sh: the node did not become idle in 60 s; see $state/slurmctld.log and $state/slurmd.log" >&2
exit 1
