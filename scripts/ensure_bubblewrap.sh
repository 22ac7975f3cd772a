#!/usr/bin/env bash
# Make sure Debian's bubblewrap is installed and can start a sandbox: the
# grader (kdcourse grade) runs every submission's kernel under bwrap, and the
# grading tests (tests/test_grading_sandbox.py, tests/test_grading_attacks.py)
# need it.
#
#   scripts/ensure_bubblewrap.sh     install if missing (apt-get, as root or via sudo -n), then try it
#
# When bubblewrap cannot be installed or cannot create its namespaces:
#   * with KDCOURSE_REQUIRE_SANDBOX=1 (set by .ci/run) this exits 1 — CI fails loudly;
#   * otherwise it prints a warning and exits 0: the sandbox tests report
#     themselves as skipped, with the reason, in pytest's summary (and
#     `kdcourse grade` refuses untrusted work unless given --no-sandbox).
set -u
BWRAP="${KDCOURSE_BWRAP:-bwrap}"

run_root() {
    if [ "$(id -u)" = "0" ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

fail() {
    if [ "${KDCOURSE_REQUIRE_SANDBOX:-0}" = "1" ]; then
        echo "ensure_bubblewrap: $1 KDCOURSE_REQUIRE_SANDBOX=1: failing." >&2
        exit 1
    fi
    echo "WARNING: ensure_bubblewrap: $1 The sandbox tests will be skipped (see pytest's summary)." >&2
    exit 0
}

if ! command -v "$BWRAP" >/dev/null 2>&1; then
    echo "ensure_bubblewrap: $BWRAP not found; installing Debian's bubblewrap with apt-get" >&2
    if ! { command -v apt-get >/dev/null 2>&1 \
        && run_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && run_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null \
        && command -v "$BWRAP" >/dev/null 2>&1; }; then
        fail "could not install bubblewrap (needs Debian/Ubuntu apt-get and root or passwordless sudo; or set KDCOURSE_BWRAP to an installed bwrap)."
    fi
    echo "ensure_bubblewrap: installed $("$BWRAP" --version 2>/dev/null)" >&2
fi

# Can it create the namespaces the grader uses?
if ! "$BWRAP" --unshare-net --unshare-pid --unshare-ipc --die-with-parent --new-session \
        $( [ "$(id -u)" = "0" ] || echo --unshare-user ) \
        --ro-bind / / --proc /proc --dev /dev --tmpfs /tmp true 2>/tmp/ensure_bubblewrap.err; then
    fail "$BWRAP is installed but cannot start a sandbox here ($(head -c 300 /tmp/ensure_bubblewrap.err)); unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)."
fi
exit 0
