# Sourced by Install and Remove: pick a Python interpreter that can import pcp.pmda (on
# some machines the python3 first on PATH is another build), and make pmdaproc.sh restart
# pmcd without systemctl where systemd is not running.
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
