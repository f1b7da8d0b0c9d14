#!/usr/bin/env bash
# Make the BTF of two Debian distro kernels available outside the repo:
#   $cache/btf/6.1.btf   Debian 12 (bookworm) linux-image-6.1.0-*-cloud-amd64-unsigned
#   $cache/btf/6.12.btf  Debian 13 (trixie)   linux-image-6.12.*+deb13-cloud-amd64-unsigned
# Each file is the raw .BTF section of the kernel's vmlinux (what
# `bpftool btf dump file F` reads). Idempotent: when both files exist the script
# does nothing. The last line on stdout is always the directory holding them:
#   dir=$(scripts/kernel-btf.sh | tail -1)
# Progress goes to stderr. Run as root (only needed when something must be fetched).
#
# apt is used with a private configuration under $cache/apt (own sources list,
# lists, cache); /etc/apt and the system's apt lists and lock are left alone.
set -euo pipefail

cache=${BPFTUNE_CACHE_DIR:-/var/cache/bpftune}
btfdir="$cache/btf"
kernels=(6.1 6.12)

say() { echo "kernel-btf: $*" >&2; }
die() { say "error: $*"; exit 1; }
# Run a command with its output (both streams) prefixed on stderr.
run() { "$@" 2>&1 | sed -u 's/^/kernel-btf:   /' >&2; }

have_all() {
    local k
    for k in "${kernels[@]}"; do
        [ -s "$btfdir/$k.btf" ] || return 1
    done
}

# Fast path: nothing to do.
if have_all; then
    echo "$btfdir"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (installs into $cache)"

mkdir -p "$btfdir" "$cache/apt"
# One run at a time (the private apt state is used without apt's own locking).
exec 9>"$cache/apt/lock"
flock 9
if have_all; then
    echo "$btfdir"
    exit 0
fi

# Leftovers of a run that was killed hard (we hold the lock, so none is live).
rm -rf "$cache"/.kernel-btf.* "$btfdir"/.*.btf.tmp.*
tmp=$(mktemp -d -p "$cache" .kernel-btf.XXXXXX)
chmod 755 "$tmp"  # apt downloads as user _apt
cleanup() { rm -rf "$tmp"; rm -f "$btfdir"/.*.btf.tmp.*; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$SECONDS

# ---------------------------------------------------------------- private apt
aptdir="$cache/apt"
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"

# The Debian archive mirror the machine already uses (first deb source ending
# in /debian), else deb.debian.org.
system_mirror() {
    local f
    {
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -r "$f" ] || continue
            awk '$1 == "deb" {
                     i = 2
                     if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                     print $i
                 }' "$f"
        done
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -r "$f" ] || continue
            awk 'BEGIN { RS = ""; FS = "\n" }
                 {
                     uris = ""; types = ""; enabled = "yes"
                     for (j = 1; j <= NF; j++) {
                         l = $j
                         if (l ~ /^[ \t]*#/) continue
                         key = tolower(l); sub(/:.*/, "", key)
                         sub(/^[^:]*:[ \t]*/, "", l)
                         if (key == "uris") uris = l
                         else if (key == "types") types = l
                         else if (key == "enabled") enabled = tolower(l)
                     }
                     if (enabled != "no" && (" " types " ") ~ / deb /) {
                         n = split(uris, u, /[ \t]+/)
                         for (j = 1; j <= n; j++) if (u[j] != "") print u[j]
                     }
                 }' "$f"
        done
    } | grep -E '^[a-z+]+://.*/debian/?$' | head -1 | sed 's:/*$::'
}

mirror=$(system_mirror || true)
mirror=${mirror:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

# apt configuration: private sources/lists/cache; no update hooks of the
# system (packagekit, appstream) since these lists are not the system's.
write_aptconf() {  # file sourcelist
    cat >"$1" <<EOF
Dir::Etc::SourceList "$2";
Dir::Etc::SourceParts "-";
Dir::State::Lists "$aptdir/lists";
Dir::Cache "$aptdir/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Debug::NoLocking "true";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
EOF
}

signed_by() { [ -r "$1" ] && echo "[signed-by=$1] " || true; }

# trixie's release keys ship in bookworm's debian-archive-keyring since
# 2023.3+deb12u2. If this machine's keyring predates that, take the keyring
# package from bookworm(-updates) -- verified by the bookworm key -- into the
# private directory and use it for trixie only. Never trusted=yes.
trixie_keyring=$keyring
if [ -e /usr/share/keyrings/debian-archive-trixie-stable.gpg ]; then
    :
elif [ -s "$aptdir/keyring/debian-archive-keyring.gpg" ]; then
    trixie_keyring="$aptdir/keyring/debian-archive-keyring.gpg"
else
    say "system keyring lacks trixie's keys; fetching debian-archive-keyring from bookworm"
    printf 'deb %s%s %s main\n' \
        "$(signed_by "$keyring")" "$mirror" bookworm \
        "$(signed_by "$keyring")" "$mirror" bookworm-updates \
        >"$aptdir/sources-keyring.list"
    write_aptconf "$aptdir/apt-keyring.conf" "$aptdir/sources-keyring.list"
    run apt-get -q -c "$aptdir/apt-keyring.conf" update
    mkdir -p "$tmp/keyring-dl" "$tmp/keyring"
    chown _apt "$tmp/keyring-dl" 2>/dev/null || true
    (cd "$tmp/keyring-dl" && run apt-get -q -c "$aptdir/apt-keyring.conf" download debian-archive-keyring)
    dpkg-deb -x "$tmp"/keyring-dl/debian-archive-keyring_*.deb "$tmp/keyring"
    [ -e "$tmp/keyring/usr/share/keyrings/debian-archive-trixie-stable.gpg" ] \
        || die "no debian-archive-keyring with trixie's keys available; not falling back to trusted=yes"
    mkdir -p "$aptdir/keyring"
    install -m 644 "$tmp/keyring/usr/share/keyrings/debian-archive-keyring.gpg" \
        "$aptdir/keyring/debian-archive-keyring.gpg"
    trixie_keyring="$aptdir/keyring/debian-archive-keyring.gpg"
fi

cat >"$aptdir/sources.list" <<EOF
deb $(signed_by "$keyring")$mirror bookworm main
deb $(signed_by "$trixie_keyring")$mirror trixie main
EOF
write_aptconf "$aptdir/apt.conf" "$aptdir/sources.list"
aptc=(-c "$aptdir/apt.conf")

# For installing a missing tool into the system: bookworm only, the system's
# dpkg (waiting for its lock if setup.sh is installing), private lists.
printf 'deb %s%s bookworm main\n' "$(signed_by "$keyring")" "$mirror" \
    >"$aptdir/sources-install.list"
write_aptconf "$aptdir/apt-install.conf" "$aptdir/sources-install.list"
sed -i '/^Debug::NoLocking/d' "$aptdir/apt-install.conf"
echo 'DPkg::Lock::Timeout "900";' >>"$aptdir/apt-install.conf"

updated=
apt_update() {
    [ -n "$updated" ] && return 0
    say "updating private apt lists (bookworm, trixie) from $mirror"
    run apt-get -q "${aptc[@]}" update
    updated=1
}

need_tool() {  # command package
    command -v "$1" >/dev/null 2>&1 && return 0
    apt_update
    say "installing $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive run apt-get -q -y --no-install-recommends \
        -c "$aptdir/apt-install.conf" install "$2"
    rm -f "$aptdir"/cache/archives/*.deb
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}

# ---------------------------------------------------------------- helpers
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
u32le() {
    local b0 b1 b2 b3
    read -r b0 b1 b2 b3 < <(od -An -tu1 -j "$2" -N4 "$1")
    echo $(( b0 | (b1 << 8) | (b2 << 16) | (b3 << 24) ))
}
hexbytes() { od -An -tx1 -j "${3:-0}" -N "$2" "$1" | tr -d ' \n'; }

# Newest package whose name matches the (extended) regex.
newest_pkg() {
    apt-cache "${aptc[@]}" pkgnames linux-image- | grep -E "$1" | sort -V | tail -1
}

# vmlinuz (x86 bzImage) -> vmlinux ELF
extract_vmlinux() {  # vmlinuz out
    local z=$1 out=$2 sects off len start magic cut=4
    [ "$(dd if="$z" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ] \
        || die "$z: not a bzImage (no HdrS)"
    sects=$(u8 "$z" $((0x1f1)))
    off=$(u32le "$z" $((0x248)))
    len=$(u32le "$z" $((0x24c)))
    start=$(( (sects + 1) * 512 + off ))
    magic=$(hexbytes "$z" 6 "$start")
    local -a dec
    case $magic in
        1f8b*)         need_tool gzip gzip;   dec=(gzip -dc); cut=0 ;;
        fd377a585a00*) need_tool xz xz-utils; dec=(xz -dc) ;;
        02214c18*)     need_tool lz4 lz4;     dec=(lz4 -dc) ;;
        28b52ffd*)     need_tool zstd zstd;   dec=(zstd -dcq) ;;
        425a68*)       need_tool bzip2 bzip2; dec=(bzip2 -dc) ;;
        5d0000*)       need_tool xz xz-utils; dec=(xz --format=lzma -dc) ;;
        894c5a4f*)     need_tool lzop lzop;   dec=(lzop -dc) ;;
        *) die "$z: unknown payload compression (magic $magic)" ;;
    esac
    say "decompressing ${dec[0]} payload ($len bytes at offset $start)"
    # All but gzip have the uncompressed size appended (*_with_size): drop it.
    dd if="$z" bs=4M iflag=skip_bytes,count_bytes skip="$start" \
        count=$((len - cut)) status=none >"$tmp/payload"
    "${dec[@]}" "$tmp/payload" >"$out"
    rm -f "$tmp/payload"
    [ "$(hexbytes "$out" 4)" = 7f454c46 ] || die "$z: payload is not an ELF vmlinux"
}

# ---------------------------------------------------------------- per kernel
fetch_btf() {  # version package-regex
    local ver=$1 re=$2 pkg work dest part vmlinuz
    dest="$btfdir/$ver.btf"
    [ -s "$dest" ] && return 0
    apt_update
    need_tool objcopy binutils
    pkg=$(newest_pkg "$re")
    [ -n "$pkg" ] || die "no package matching $re"
    work="$tmp/$ver"
    mkdir -p "$work/dl" "$work/root"
    chown _apt "$work/dl" 2>/dev/null || true
    say "$ver: downloading $pkg"
    (cd "$work/dl" && run apt-get -q "${aptc[@]}" download "$pkg")
    # Only the kernel image is needed, not the modules.
    dpkg-deb --fsys-tarfile "$work"/dl/*.deb \
        | tar -x -C "$work/root" --wildcards './boot/vmlinuz-*'
    rm -rf "$work/dl"
    vmlinuz=$(ls "$work"/root/boot/vmlinuz-* | head -1)
    say "$ver: extracting vmlinux from $(basename "$vmlinuz")"
    extract_vmlinux "$vmlinuz" "$work/vmlinux"
    part=$(mktemp -p "$btfdir" ".$ver.btf.tmp.XXXXXX")
    objcopy -O binary --only-section=.BTF "$work/vmlinux" "$part"
    rm -rf "$work"
    [ "$(hexbytes "$part" 2)" = 9feb ] || die "$ver: extracted .BTF has no BTF magic"
    if command -v bpftool >/dev/null 2>&1; then
        bpftool btf dump file "$part" >/dev/null || die "$ver: bpftool cannot read the BTF"
    fi
    chmod 644 "$part"
    mv -f "$part" "$dest"
    say "$ver: wrote $dest ($(stat -c %s "$dest") bytes)"
}

fetch_btf 6.1  '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$'
fetch_btf 6.12 '^linux-image-6\.12\.[0-9]+\+deb13-cloud-amd64-unsigned$'

say "done in $((SECONDS - start))s"
echo "$btfdir"
