#!/usr/bin/env bash
# Turns a bare Debian 12 into a ScaiGrid appliance in idempotent stages; the bare-host install and the image build both run it.
#
#   sudo appliance/provision.sh --wheel dist/scaigrid-X.Y.Z-py3-none-any.whl
#   appliance/provision.sh --stages install,units --wheel W.whl --find-links /srv/wheelhouse
#
# Stages (default: all, in this order; --stages picks some):
#   packages  Debian packages; Debian's own nginx.service and supervisor.service are disabled
#             (supervisord runs nginx under scaigrid-appliance.service); mariadb and redis stay enabled;
#             MariaDB's max_connections raised to 1000 (a pool per http process)
#   user      system user and group scaigrid, /etc/scaigrid, /var/lib/scaigrid, /var/log/scaigrid
#   install   /opt/scaigrid/venv with the wheel given by --wheel; a copy is kept in /opt/scaigrid/wheels/;
#             /usr/local/bin/scaigrid-appliance links to the venv's CLI
#   units     systemd/*.service and *.target into /etc/systemd/system, scaigrid.target enabled
#   garage    /usr/local/bin/garage from --garage-url, only after its sha256 matches --garage-sha256
#             (without --garage-url the stage does nothing)
# Exit status: 0 done, 1 a stage failed (the line before says why), 2 bad usage.
# pip reads its own environment too: PIP_FIND_LINKS, PIP_NO_INDEX=1 (offline from a wheelhouse),
# PIP_CONSTRAINT=FILE (pin dependency versions, e.g. the project's constraints.txt).
set -euo pipefail

readonly ALL_STAGES=(packages user install units garage)
readonly PACKAGES=(mariadb-server redis-server nginx supervisor python3 python3-venv openssl ca-certificates curl)
readonly APP_USER=scaigrid
readonly CONFIG_DIR=/etc/scaigrid
readonly STATE_DIR=/var/lib/scaigrid
readonly LOG_DIR=/var/log/scaigrid
readonly PREFIX=/opt/scaigrid
readonly VENV=$PREFIX/venv
readonly WHEELS=$PREFIX/wheels
readonly UNIT_DIR=/etc/systemd/system
readonly GARAGE_BIN=/usr/local/bin/garage
readonly CLI_LINK=/usr/local/bin/scaigrid-appliance

stages=$(IFS=,; echo "${ALL_STAGES[*]}")
wheel=""
find_links=${PIP_FIND_LINKS:-}
units_dir=$(dirname "$(readlink -f "$0")")/../systemd
garage_url=${GARAGE_URL:-}
garage_sha256=${GARAGE_SHA256:-}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    cat <<EOF

Options:
  --stages LIST          comma-separated stages (default: $stages)
  --wheel PATH           the scaigrid wheel to install (needed by the install stage)
  --find-links DIR       extra wheel directory for pip (default: \$PIP_FIND_LINKS)
  --units-dir DIR        where the unit files are (default: systemd/ beside this script's folder)
  --garage-url URL       Garage binary to install (https://, file://; default: \$GARAGE_URL)
  --garage-sha256 HEX    its expected sha256 (default: \$GARAGE_SHA256)
EOF
}

say() { echo "$*"; }
# What a stage did, one line each; a stage that reports nothing says "already done".
report() { echo "  $*"; changed=1; }
die() { echo "provision: $*" >&2; exit 1; }
usage_error() { echo "provision: $*" >&2; echo "try: $0 --help" >&2; exit 2; }

value() { [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"; echo "$2"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --stages) stages=$(value "$@"); shift 2 ;;
        --wheel) wheel=$(value "$@"); shift 2 ;;
        --find-links) find_links=$(value "$@"); shift 2 ;;
        --units-dir) units_dir=$(value "$@"); shift 2 ;;
        --garage-url) garage_url=$(value "$@"); shift 2 ;;
        --garage-sha256) garage_sha256=$(value "$@"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

IFS=, read -r -a selected <<<"$stages"
for stage in "${selected[@]}"; do
    [[ " ${ALL_STAGES[*]} " == *" $stage "* ]] || usage_error "unknown stage '$stage' (stages: ${ALL_STAGES[*]})"
done
wants() { [[ ",$stages," == *",$1,"* ]]; }
# Checked before any stage runs, so a bad call changes nothing.
if wants install; then
    [[ -n $wheel ]] || usage_error "the install stage needs --wheel PATH"
    [[ -f $wheel ]] || usage_error "no such wheel: $wheel"
    wheel=$(readlink -f "$wheel")
fi
if wants garage && [[ -n $garage_url ]]; then
    [[ $garage_sha256 =~ ^[0-9a-fA-F]{64}$ ]] || usage_error "--garage-url needs --garage-sha256 with 64 hex digits"
fi
[[ $(id -u) -eq 0 ]] || die "must run as root (sudo $0 ...)"

# sd_booted(): in a chroot or an image build no systemd runs, so nothing may be started or reloaded there.
systemd_running() { [[ -d /run/systemd/system ]]; }

ensure_dir() {  # ensure_dir MODE OWNER:GROUP PATH
    local mode=$1 owner=$2 path=$3
    if [[ -d $path && $(stat -c '%a %U:%G' "$path") == "${mode#0} $owner" ]]; then
        return 0
    fi
    install -d -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$path"
    report "$path: $mode $owner"
}

stage_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        report "installing: ${missing[*]}"
        local policy=/usr/sbin/policy-rc.d own_policy=0
        if ! systemd_running && [[ ! -e $policy ]]; then
            # Maintainer scripts would start mariadb and nginx in the build chroot (on the build host's ports).
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy"
            own_policy=1
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        if [[ $own_policy -eq 1 ]]; then rm -f "$policy"; trap - EXIT; fi
    fi
    local unit
    for unit in nginx.service supervisor.service; do
        if systemctl is-enabled --quiet "$unit" 2>/dev/null || { systemd_running && systemctl is-active --quiet "$unit"; }; then
            # supervisord runs nginx under scaigrid-appliance.service: the stock units would hold port 80
            # and start a second supervisord with Debian's config.
            systemctl disable --quiet "$unit"
            if systemd_running; then systemctl stop "$unit"; fi
            report "disabled $unit"
        fi
    done
    for unit in mariadb.service redis-server.service; do
        if ! systemctl is-enabled --quiet "$unit" 2>/dev/null; then
            systemctl enable --quiet "$unit"
            report "enabled $unit"
        fi
    done
    # Each http process (one per CPU) keeps a pool of DATABASE_POOL_SIZE connections and as many again in bursts:
    # MariaDB's default of 151 connections is too few for a large VM.
    local cnf=/etc/mysql/mariadb.conf.d/60-scaigrid.cnf
    local wanted=$'# written by scaigrid provision.sh\n[mysqld]\nmax_connections = 1000\n'
    if ! printf '%s' "$wanted" | cmp -s - "$cnf"; then
        printf '%s' "$wanted" >"$cnf"
        report "$cnf: max_connections 1000"
        if systemd_running && systemctl is-active --quiet mariadb.service; then systemctl restart mariadb.service; fi
    fi
}

stage_user() {
    if ! getent group "$APP_USER" >/dev/null; then
        groupadd --system "$APP_USER"
        report "group $APP_USER created"
    fi
    if ! getent passwd "$APP_USER" >/dev/null; then
        useradd --system --gid "$APP_USER" --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "ScaiGrid appliance" "$APP_USER"
        report "user $APP_USER created"
    fi
    # The group may read the configuration (supervisord drops the programs to scaigrid); secrets/ inside is root's.
    ensure_dir 0750 "root:$APP_USER" "$CONFIG_DIR"
    # Root owns what root processes write into (supervisord's logs, nginx's temp dirs, backups): a program running
    # as scaigrid must not be able to plant a symlink there for root to follow. init gives scaigrid its own corner.
    ensure_dir 0755 "root:root" "$STATE_DIR"
    ensure_dir 0750 "root:$APP_USER" "$LOG_DIR"
}

stage_install() {
    local name current
    name=$(basename "$wheel")
    current=$WHEELS/current
    # On root's and sudo's PATH, as every document writes it: `sudo scaigrid-appliance status`.
    if [[ $(readlink "$CLI_LINK" 2>/dev/null) != "$VENV/bin/scaigrid-appliance" ]]; then
        ln -sfn "$VENV/bin/scaigrid-appliance" "$CLI_LINK"
        report "$CLI_LINK -> $VENV/bin/scaigrid-appliance"
    fi
    if [[ -x $VENV/bin/scaigrid-appliance && -e $current ]] && cmp -s "$wheel" "$current"; then
        return 0
    fi
    if [[ ! -x $VENV/bin/python ]]; then
        python3 -m venv "$VENV"
        report "created $VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
    local links=()
    if [[ -n $find_links ]]; then links=(--find-links "$find_links"); fi
    "${pip[@]}" install "${links[@]}" "$wheel"
    # pip takes a rebuilt wheel of an already installed version as installed: put this very build in place
    # (its dependencies came with the line above).
    "${pip[@]}" install "${links[@]}" --no-deps --force-reinstall "$wheel"
    ensure_dir 0755 root:root "$WHEELS"
    # A rollback may name a kept wheel itself.
    [[ $wheel -ef $WHEELS/$name ]] || install -m 0644 "$wheel" "$WHEELS/$name"
    ln -sfn "$name" "$current"
    report "installed $name into $VENV (kept in $WHEELS for rollback)"
}

stage_units() {
    local units=() unit
    shopt -s nullglob
    units=("$units_dir"/*.service "$units_dir"/*.target)
    shopt -u nullglob
    [[ ${#units[@]} -gt 0 ]] || die "no unit files in $units_dir (use --units-dir)"
    for unit in "${units[@]}"; do
        if ! cmp -s "$unit" "$UNIT_DIR/$(basename "$unit")"; then
            install -m 0644 "$unit" "$UNIT_DIR/"
            report "$UNIT_DIR/$(basename "$unit")"
        fi
    done
    # For render's drop-in (the stop timeout); scaigrid-firstboot.service may write nowhere else under /etc/systemd.
    ensure_dir 0755 root:root "$UNIT_DIR/scaigrid-appliance.service.d"
    # enable works offline (it only writes symlinks), so the image build needs no running systemd;
    # a running one must re-read changed files before the next start.
    if systemd_running && [[ $changed -eq 1 ]]; then
        systemctl daemon-reload
    fi
    # The target wants the appliance's units (firstboot, migrate, the appliance), so it is the one to enable.
    if ! systemctl is-enabled --quiet scaigrid.target 2>/dev/null; then
        systemctl enable --quiet scaigrid.target
        report "enabled scaigrid.target"
    fi
}

stage_garage() {
    if [[ -z $garage_url ]]; then
        report "skipped: no --garage-url"
        return 0
    fi
    local expected=${garage_sha256,,}
    if [[ -x $GARAGE_BIN && $(sha256sum "$GARAGE_BIN" | cut -d' ' -f1) == "$expected" ]]; then
        return 0
    fi
    local download
    download=$(mktemp)
    # shellcheck disable=SC2064  # the path is fixed now
    trap "rm -f '$download'" EXIT
    curl -fsSL --retry 3 -o "$download" "$garage_url" || die "garage: download of $garage_url failed"
    local actual
    actual=$(sha256sum "$download" | cut -d' ' -f1)
    if [[ $actual != "$expected" ]]; then
        die "garage: sha256 mismatch for $garage_url: expected $expected, got $actual; nothing installed"
    fi
    install -m 0755 "$download" "$GARAGE_BIN"
    rm -f "$download"
    trap - EXIT
    report "installed $GARAGE_BIN (sha256 $actual)"
}

for stage in "${ALL_STAGES[@]}"; do
    wants "$stage" || continue
    say "== stage $stage =="
    changed=0
    "stage_$stage"
    [[ $changed -eq 1 ]] || say "  already done"
done
