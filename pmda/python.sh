# Sourced by Install and Remove: pick a Python interpreter that can import pcp.pmda (on
# some machines the python3 first on PATH is another build), make pmdaproc.sh restart
# pmcd without systemctl where systemd is not running, and keep pmcd.conf's layout.
for python in "$PCP_PYTHON_PROG" python3 /usr/bin/python3 /usr/libexec/platform-python; do
    [ -n "$python" ] || continue
    python=$(command -v "$python" 2>/dev/null) || continue
    if "$python" -c 'from pcp import pmda' 2>/dev/null; then
        PCP_PYTHON_PROG=$python
        export PCP_PYTHON_PROG
        break
    fi
done
[ -d /run/systemd/system ] || { PCPQA_SYSTEMD=no; export PCPQA_SYSTEMD; }

# pmdaproc.sh rewrites pmcd.conf when it adds an agent: it drops blank lines and sorts
# everything above [access] with `sort -n -k2`, comments included, so the package's
# header comments and its agents change places (on a new machine, the first Install of
# any PMDA does it). Removing the agent later only deletes its line. Install keeps the
# file as it was, and Remove puts it back when pmcd would read the same from both: same
# agents, same [access] rules. Anything else changed meanwhile (another PMDA installed or
# removed, an edit): Remove leaves pmdaproc.sh's file alone.
bpftune_conf_saved="$PCP_PMDAS_DIR/bpftune/pmcd.conf.before-install"

# What pmcd reads from a pmcd.conf: the agents (whitespace normalised, sorted), then the
# [access] rules (in order); no comments, no blank lines.
_bpftune_conf_meaning()
{
    $PCP_AWK_PROG '
/^[ \t]*\[[ \t]*access[ \t]*\]/	{ exit }
/^[ \t]*#/ || NF == 0		{ next }
				{ $1 = $1; print }' "$1" | LC_ALL=C sort
    echo "[access]"
    $PCP_AWK_PROG '
/^[ \t]*\[[ \t]*access[ \t]*\]/	{ access = 1; next }
/^[ \t]*#/ || NF == 0 || !access	{ next }
				{ $1 = $1; print }' "$1"
}

# Install: keep pmcd.conf as it is before our agent is first added (a reinstall keeps
# the copy made by the first Install).
_bpftune_save_conf()
{
    [ -f "$PCP_PMCDCONF_PATH" ] || return 0
    grep "^bpftune[ 	]" "$PCP_PMCDCONF_PATH" >/dev/null 2>&1 && return 0
    cp -p "$PCP_PMCDCONF_PATH" "$bpftune_conf_saved"
}

# Remove, after pmdaRemove: put the kept pmcd.conf back if it means the same.
_bpftune_restore_conf()
{
    [ -f "$bpftune_conf_saved" ] || return 0
    if [ -f "$PCP_PMCDCONF_PATH" ] && \
       [ "$(_bpftune_conf_meaning "$bpftune_conf_saved")" = \
         "$(_bpftune_conf_meaning "$PCP_PMCDCONF_PATH")" ]; then
        if ! cmp -s "$bpftune_conf_saved" "$PCP_PMCDCONF_PATH"; then
            # same agents and rules: pmcd needs no signal; same file, owner and mode
            cat "$bpftune_conf_saved" >"$PCP_PMCDCONF_PATH"
            echo "Restored the layout of $PCP_PMCDCONF_PATH from before Install"
        fi
    fi
    rm -f "$bpftune_conf_saved"
}
