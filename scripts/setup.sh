#!/usr/bin/env bash
# Set up a Debian or Ubuntu machine to build, run and test sandtrace. Idempotent: a re-run
# with everything in place checks and returns in about a second.
#
#   sudo scripts/setup.sh                system packages, kernel headers, tracefs, then .venv
#   sudo scripts/setup.sh --system-only  only what needs root
#        scripts/setup.sh --venv-only    only .venv (needs python3-venv already installed)
#
# Why each step:
# - BCC's Python module comes from the distribution's python3-bpfcc only (the PyPI package
#   named "bcc" is unrelated), so .venv is made by the system interpreter /usr/bin/python3
#   with --system-site-packages; a pyenv or other python3 on PATH cannot see it.
# - BCC compiles its C at run time against /lib/modules/$(uname -r)/build. Kernels without
#   a matching headers package get the distribution's generic headers linked into place;
#   the probes take struct offsets from BTF, so the headers' layouts are never trusted.
# - BCC reads tracepoint formats from tracefs, which a fresh machine may not have mounted.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SYSTEM_PYTHON=/usr/bin/python3
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.sandtrace-setup-stamp"
TRACEFS=/sys/kernel/tracing
KERNEL_RELEASE="$(uname -r)"
MODULES_DIR="/lib/modules/$KERNEL_RELEASE"

PACKAGES=(
	python3-bpfcc bpfcc-tools bpftool clang-format python3-venv python3-dev
	iproute2 openssh-server openssh-client rsyslog rsyslog-gnutls procps
	netcat-openbsd socat curl wget git gcc libc6-dev openssl systemd age publicsuffix
	golang-go rpm
)

step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
	printf 'setup.sh: error: %s\n' "$*" >&2
	exit 1
}
trap 'printf "setup.sh: error: command failed (line %s): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

usage() {
	sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

do_system=1
do_venv=1
for arg in "$@"; do
	case "$arg" in
	--system-only) do_venv=0 ;;
	--venv-only) do_system=0 ;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown option '$arg' (see --help)" ;;
	esac
done
((do_system || do_venv)) || die "--system-only and --venv-only exclude each other"

# ---------------------------------------------------------------------------------------------
# apt helpers: the package lists are refreshed at most once, and only when something is missing.
export DEBIAN_FRONTEND=noninteractive
apt_updated=0

apt_update_once() {
	if ((apt_updated == 0)); then
		info "apt-get update"
		apt-get -o DPkg::Lock::Timeout=300 update -qq
		apt_updated=1
	fi
}

apt_install() {
	apt_update_once
	info "apt-get install $*"
	apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@"
}

is_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]
}

is_available() {
	local policy
	policy="$(apt-cache policy "$1" 2>/dev/null)" || return 1
	[[ "$policy" =~ Candidate:\ [^\(] ]]
}

is_ubuntu() {
	# shellcheck disable=SC1091
	(. /etc/os-release && [[ "${ID:-}" == ubuntu || " ${ID_LIKE:-} " == *" ubuntu "* ]])
}

# ---------------------------------------------------------------------------------------------
install_packages() {
	step "System packages"
	local wanted=("${PACKAGES[@]}") missing=() pkg
	if is_ubuntu && ! is_installed bpftool; then
		# Ubuntu ships bpftool in linux-tools; a working command is enough.
		local keep=()
		for pkg in "${wanted[@]}"; do [[ "$pkg" == bpftool ]] || keep+=("$pkg"); done
		wanted=("${keep[@]}")
		if ! bpftool version >/dev/null 2>&1; then
			apt_update_once
			if is_available bpftool; then
				wanted+=(bpftool)
			elif is_available "linux-tools-$KERNEL_RELEASE"; then
				wanted+=(linux-tools-common "linux-tools-$KERNEL_RELEASE")
			else
				wanted+=(linux-tools-generic)
			fi
		fi
	fi
	for pkg in "${wanted[@]}"; do
		is_installed "$pkg" || missing+=("$pkg")
	done
	if ((${#missing[@]} == 0)); then
		info "all present: ${wanted[*]}"
	else
		info "missing: ${missing[*]}"
		apt_install "${missing[@]}"
	fi
}

headers_usable() {
	[[ -d "$MODULES_DIR/build/include" ]]
}

install_kernel_headers() {
	step "Kernel headers for BCC ($MODULES_DIR/build)"
	if headers_usable; then
		info "present: build -> $(readlink -f "$MODULES_DIR/build")"
		return
	fi

	apt_update_once
	if is_available "linux-headers-$KERNEL_RELEASE"; then
		apt_install "linux-headers-$KERNEL_RELEASE"
		if headers_usable; then
			info "installed linux-headers-$KERNEL_RELEASE"
			return
		fi
	fi

	# No headers package for this kernel: link the distribution's generic headers into place.
	local flavour meta
	if is_ubuntu; then
		flavour=generic
		meta=linux-headers-generic
	else
		flavour="$(dpkg --print-architecture)"
		meta="linux-headers-$flavour"
	fi
	info "no linux-headers-$KERNEL_RELEASE in apt; falling back to $meta"
	is_installed "$meta" || apt_install "$meta"

	local build source
	build="$(find /usr/src -maxdepth 1 -type d -name "linux-headers-*-$flavour" | sort -V | tail -n 1)"
	[[ -n "$build" ]] || die "$meta installed no /usr/src/linux-headers-*-$flavour directory"
	# Debian splits headers into <ver>-<arch> and <ver>-common; Ubuntu into <ver>-generic and <ver>.
	source="${build%-"$flavour"}-common"
	[[ -d "$source" ]] || source="${build%-"$flavour"}"
	[[ -d "$source" ]] || die "no source headers directory beside $build"

	mkdir -p "$MODULES_DIR"
	local name
	for name in build source; do
		if [[ -e "$MODULES_DIR/$name" && ! -L "$MODULES_DIR/$name" ]]; then
			die "$MODULES_DIR/$name exists and is not a symlink; move it away and re-run"
		fi
	done
	ln -sfn "$build" "$MODULES_DIR/build"
	ln -sfn "$source" "$MODULES_DIR/source"
	headers_usable || die "linked $MODULES_DIR/build -> $build, but it has no include/ directory"
	info "linked build -> $build"
	info "linked source -> $source"
	info "note: these headers are not for kernel $KERNEL_RELEASE; sandtrace reads struct offsets from BTF"
}

mount_tracefs() {
	step "tracefs at $TRACEFS"
	if mountpoint -q "$TRACEFS"; then
		info "mounted"
	else
		mount -t tracefs tracefs "$TRACEFS" || die "cannot mount tracefs at $TRACEFS"
		info "mounted now"
	fi
}

# ---------------------------------------------------------------------------------------------
venv_is_sound() {
	local cfg="$VENV/pyvenv.cfg"
	[[ -x "$VENV/bin/python" && -f "$cfg" ]] &&
		grep -Eq '^include-system-site-packages *= *true' "$cfg" &&
		grep -Eq '^home *= */usr/bin$' "$cfg" &&
		"$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}

setup_venv() {
	step "Python virtual environment ($VENV)"
	[[ -x "$SYSTEM_PYTHON" ]] ||
		die "$SYSTEM_PYTHON not found: run 'sudo scripts/setup.sh' (installs python3-venv)"
	"$SYSTEM_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
		die "sandtrace needs Python >= 3.11; $SYSTEM_PYTHON is $("$SYSTEM_PYTHON" -V 2>&1) (use Debian 12+ or Ubuntu 24.04+)"

	if [[ -d "$VENV" ]] && ! venv_is_sound; then
		info "existing .venv was not made by $SYSTEM_PYTHON with system site packages: recreating"
		rm -rf "$VENV"
	fi
	if [[ ! -d "$VENV" ]]; then
		info "$SYSTEM_PYTHON -m venv --system-site-packages .venv"
		"$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV" ||
			die "creating .venv failed: run 'sudo scripts/setup.sh' (installs python3-venv)"
	fi

	local want have=""
	want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
	[[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
	if [[ "$want" == "$have" ]]; then
		info "dependencies up to date (pyproject.toml unchanged)"
	else
		info "pip install -e '.[dev]'"
		(cd "$REPO_ROOT" && "$VENV/bin/pip" install -q --disable-pip-version-check --progress-bar off \
			-e '.[dev]')
		printf '%s\n' "$want" >"$STAMP"
	fi
}

check_bcc() {
	step "BCC in .venv"
	if "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
		info "import bcc: ok"
	elif ((do_system)); then
		die ".venv/bin/python cannot import bcc; check that python3-bpfcc is installed (dpkg -s python3-bpfcc)"
	else
		info "import bcc failed: run 'sudo scripts/setup.sh' before kernel tests or 'sandtrace'"
	fi
}

# ---------------------------------------------------------------------------------------------
if ((do_system)); then
	[[ "$(id -u)" == 0 ]] ||
		die "installing packages, linking kernel headers and mounting tracefs need root: run with sudo (sudo make setup)"
	command -v apt-get >/dev/null || die "apt-get not found: only Debian and Ubuntu are supported"
	install_packages
	install_kernel_headers
	mount_tracefs
fi
if ((do_venv)); then
	setup_venv
	check_bcc
fi
step "Setup done"
