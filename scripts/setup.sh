#!/usr/bin/env bash
# Idempotent machine setup for bpftune: system packages, kernel headers for BCC,
# tracefs, the development venv. Safe to run any number of times (as root).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

say() { echo "setup: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (BPF, sysctls and namespaces need it)" >&2
    exit 1
fi

# python3-systemd: the audit trail's journald fields; like bcc and pcp, the venv sees it
# through --system-site-packages (make_venv).
apt_packages=(python3 python3-venv python3-bpfcc bpfcc-tools bpftool
              linux-headers-amd64 iperf3 iproute2 nftables
              python3-pyroute2 python3-jinja2 pcp python3-pcp redis-server
              rpm python3-docutils make cpio systemd stress-ng
              python3-cap-ng libcap2-bin iputils-ping hping3 libbpf1
              python3-systemd)
dnf_packages=(python3 python3-bcc bcc-tools bpftool kernel-devel iperf3
              iproute nftables python3-pyroute2 python3-jinja2 pcp python3-pcp valkey
              rpm-build python3-docutils make cpio systemd stress-ng
              python3-libcap-ng libcap iputils hping3 libbpf
              python3-systemd)

missing_apt() {
    local p
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

# The pcp postinst calls systemctl, which fails where systemd is not PID 1:
# finish configuring with a stand-in systemctl that succeeds.
configure_without_systemd() {
    local stub
    stub=$(mktemp -d)
    printf '#!/bin/sh\nexit 0\n' >"$stub/systemctl"
    chmod +x "$stub/systemctl"
    PATH="$stub:$PATH" dpkg --configure -a || true
    rm -rf "$stub"
}

install_packages() {
    if command -v apt-get >/dev/null; then
        local need
        need=$(missing_apt)
        [ -z "$need" ] && return 0
        say "installing: $need"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $need || configure_without_systemd
        configure_without_systemd
        need=$(missing_apt)
        if [ -n "$need" ]; then
            echo "setup: could not install: $need" >&2
            exit 1
        fi
    elif command -v dnf >/dev/null; then
        dnf install -y -q "${dnf_packages[@]}"
    else
        echo "setup: no apt-get or dnf; install ${apt_packages[*]} by hand" >&2
        exit 1
    fi
}

# BCC compiles against /lib/modules/$(uname -r)/build. Custom kernels have no
# matching headers package, so link the distro's newest headers there; struct
# layouts are never taken from them (offsets come from BTF at run time).
link_kernel_headers() {
    local mod="/lib/modules/$(uname -r)"
    [ -e "$mod/build/include" ] && return 0
    local build common
    build=$(shopt -s nullglob; printf '%s\n' /usr/src/linux-headers-*-amd64 /usr/src/kernels/* | sort -V | tail -n 1)
    [ -n "$build" ] || { echo "setup: no kernel headers under /usr/src" >&2; exit 1; }
    common=${build%-amd64}-common
    mkdir -p "$mod"
    ln -sfn "$build" "$mod/build"
    [ -d "$common" ] && ln -sfn "$common" "$mod/source"
    say "linked $mod/build -> $build"
}

# Start a PCP service unless `check` already succeeds. pmcd starts the PMDAs with its own
# PATH: give it one where python3 is the system Python (the one with the pcp module).
# Services outlive this script: they must not inherit its descriptors. A lock file a caller
# holds around a test or bench run (`flock LOCK bench/run`) stayed held by pmproxy for good.
close_inherited_fds() {
    local fd
    for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done
}

start_service() {
    local name=$1 check=$2
    eval "$check" >/dev/null 2>&1 && return 0
    if [ -d /run/systemd/system ]; then
        systemctl start "$name"
    else
        (close_inherited_fds
         env PATH=/usr/sbin:/usr/bin:/sbin:/bin "/etc/init.d/$name" start >/dev/null)
    fi
    for _ in $(seq 30); do
        eval "$check" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "setup: $name did not start" >&2
    exit 1
}

mount_tracefs() {
    mountpoint -q /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing
}

make_venv() {
    local py=/usr/bin/python3
    if [ ! -x "$venv/bin/python" ]; then
        "$py" -m venv --system-site-packages "$venv"
    fi
    if ! "$venv/bin/python" -c "import bpftune, pytest, ruff" 2>/dev/null ||
       [ "$repo/pyproject.toml" -nt "$venv/.installed" ]; then
        "$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[test]"
        touch "$venv/.installed"
    fi
}

install_packages
link_kernel_headers
mount_tracefs
start_service pmcd "pminfo -f pmcd.version"
# pmproxy serves PCP's REST API (the one Grafana's PCP datasources use) on port 44322.
start_service pmproxy "exec 3<>/dev/tcp/127.0.0.1/44322"
make_venv
# BTF of the distro kernels tests/test_portability.py plans and compiles for (fetched once).
"$repo/scripts/kernel-btf.sh" >/dev/null
say "ready ($venv)"
