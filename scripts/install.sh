#!/usr/bin/env bash
# Install the relay as a system service, from this checkout, as root:
#     sudo scripts/install.sh
# - a system user (SWIMMY_USER, default swimmy) that owns only data/ and logs/;
# - a virtual environment at $SWIMMY_HOME/.venv (default /opt/swimmy) with a regular,
#   non-editable install of this checkout: the code is root's, read-only to the service;
# - the systemd units (SYSTEMD_DIR, default /etc/systemd/system) and the logrotate
#   configuration (LOGROTATE_DIR, default /etc/logrotate.d), with these paths and user;
# - when systemd runs and SYSTEMD_DIR is its own: the relay and the merge's timer enabled
#   and started.
# Run it again to upgrade: the venv is reused, the package and the files replaced.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${SWIMMY_HOME:-/opt/swimmy}"
user="${SWIMMY_USER:-swimmy}"
systemd_dir="${SYSTEMD_DIR:-/etc/systemd/system}"
logrotate_dir="${LOGROTATE_DIR:-/etc/logrotate.d}"

# The units and the logrotate file carry SWIMMY_HOME and SWIMMY_USER as they are: refuse
# what they cannot carry unquoted (whitespace splits ExecStart=, Environment= and
# ReadWritePaths=; % and $ are systemd's specifiers and variables; quotes, backslashes...)
# before changing anything.
refuse() { echo "install.sh: $1; nothing was installed" >&2; exit 2; }
case "$home" in
    /*) ;;
    *) refuse "SWIMMY_HOME must be an absolute path, got '$home'" ;;
esac
if ! [[ "$home" =~ ^(/[A-Za-z0-9_+.-]+)+$ ]] || [[ "$home" =~ /\.\.?(/|$) ]]; then
    refuse "SWIMMY_HOME '$home' cannot be written into systemd units unquoted: choose a plain path (letters, digits, '.', '_', '+', '-' between slashes, no '.' or '..' parts)"
fi
[[ "$user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
    refuse "SWIMMY_USER '$user' is not a plain user name (lower-case letters, digits, '_', '-')"

if ! id "$user" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$home" --no-create-home \
        --shell /usr/sbin/nologin "$user"
fi
group="$(id -gn "$user")"

install -d -m 0755 "$home"
install -d -m 0750 -o "$user" -g "$group" "$home/data" "$home/logs"
[ -x "$home/.venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$home/.venv"
"$home/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$root"
install -m 0644 "$root/README.md" "$home/README.md"

# The shipped files name /opt/swimmy and the user swimmy: put this install's in.
configure() {
    sed -e "s|/opt/swimmy|$home|g" -e "s|^User=swimmy|User=$user|" \
        -e "s|^Group=swimmy|Group=$group|" -e "s|swimmy swimmy|$user $group|" "$1"
}
install -d "$systemd_dir" "$logrotate_dir"
for unit in swimmy-notifier.service swimmy-telemetry.service swimmy-telemetry.timer; do
    configure "$root/scripts/$unit" >"$systemd_dir/$unit"
    chmod 0644 "$systemd_dir/$unit"
done
configure "$root/scripts/swimmy-notifier.logrotate" >"$logrotate_dir/swimmy-notifier"
chmod 0644 "$logrotate_dir/swimmy-notifier"

echo "installed $("$home/.venv/bin/swimmy-notifier" --version) in $home for user $user"
if [ -d /run/systemd/system ] && [ "$systemd_dir" = /etc/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now swimmy-notifier.service swimmy-telemetry.timer
    systemctl --no-pager status swimmy-notifier.service | head -5
else
    echo "systemd is not running here (or SYSTEMD_DIR is not its own): enable the units with"
    echo "    systemctl daemon-reload && systemctl enable --now swimmy-notifier swimmy-telemetry.timer"
fi
