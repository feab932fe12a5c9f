#!/usr/bin/env bash
# Builds husk's guest kernel and initramfs:
#
#   target/guest/vmlinux             uncompressed ELF, booted at its ELF entry
#   target/guest/initramfs.cpio.gz   static husk-agent as /init (newc cpio, stored gzip)
#   target/guest/System.map          symbols for decoding addresses (no kallsyms)
#   target/guest/kernel.config       the resolved kernel .config
#
# The kernel is Debian's linux-source-6.12 built from `make tinyconfig` plus
# guest-image/husk.config, with guest-image/patches/*.patch applied. It is cached
# by the hash of its inputs under
# $HUSK_GUEST_CACHE/guest/kernel-<hash>/ (default /var/cache/husk); the initramfs is
# cached by the hash of the agent binary. See guest-image/README.md.
set -Eeuo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/.." && pwd)
CACHE=${HUSK_GUEST_CACHE:-/var/cache/husk}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/guest
RUST_TARGET=x86_64-unknown-linux-gnu
KPKG=linux-source-6.12
KTARBALL=/usr/src/$KPKG.tar.xz
DEPS=("$KPKG" bc bison flex libelf-dev libssl-dev cpio xz-utils build-essential patch python3)

START_NS=$(date +%s%N)
elapsed() { local now; now=$(date +%s%N); printf '%d.%01d' $(((now - START_NS) / 1000000000)) $(((now - START_NS) / 100000000 % 10)); }
step() { printf '[guest-image %6ss] %s\n' "$(elapsed)" "$*"; }
die() { printf '[guest-image %6ss] ERROR: %s\n' "$(elapsed)" "$*" >&2; exit 1; }
trap 'die "command failed (exit $?) at build.sh line $LINENO: $BASH_COMMAND"' ERR
sha() { sha256sum | cut -c1-16; }
size_of() { du -h --apparent-size -- "$1" | cut -f1; }

# --- 1. Build dependencies ------------------------------------------------------
missing=()
for p in "${DEPS[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || true
	[[ $status == 'install ok installed' ]] || missing+=("$p")
done
if ((${#missing[@]})); then
	step "installing missing packages: ${missing[*]}"
	sudo=()
	((EUID == 0)) || sudo=(sudo)
	"${sudo[@]}" apt-get update -q >/dev/null ||
		die "apt-get update failed"
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
else
	step "build dependencies present"
fi
[[ -f $KTARBALL ]] || die "$KTARBALL missing although $KPKG is installed"
KVERSION=$(dpkg-query -W -f='${Version}' "$KPKG")

mkdir -p -- "$CACHE/guest" "$CACHE/build" 2>/dev/null && [[ -w $CACHE/guest && -w $CACHE/build ]] ||
	die "cache directory $CACHE is not writable (set HUSK_GUEST_CACHE to another directory)"

# One build at a time per cache: concurrent runs wait instead of sharing a tree.
exec 9>"$CACHE/guest/.lock"
if ! flock -n 9; then
	step "waiting for another build.sh holding $CACHE/guest/.lock"
	flock 9
fi

# --- 2. Kernel ------------------------------------------------------------------
# Everything that determines the kernel: this script, the fragment, the source
# package version and the toolchain.
KHASH=$({
	sha256sum <"$HERE/build.sh"
	sha256sum <"$HERE/husk.config"
	cat "$HERE"/patches/*.patch | sha256sum
	echo "$KPKG $KVERSION"
	gcc --version | sed -n 1p
	ld --version | sed -n 1p
} | sha)
KDIR=$CACHE/guest/kernel-$KHASH

# Checks that every option in the fragment has the value the fragment asks for.
verify_config() {
	local frag=$1 config=$2 line name want got bad=()
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			name=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
		elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
			name=${BASH_REMATCH[1]} want=n
		else
			continue
		fi
		got=$(grep -m1 "^$name=" "$config" | cut -d= -f2-) || true
		[[ -n $got ]] || got=n
		[[ $got == "$want" ]] || bad+=("$name: wanted $want, got $got")
	done <"$frag"
	if ((${#bad[@]})); then
		printf '  %s\n' "${bad[@]}" >&2
		die "Kconfig did not honour ${#bad[@]} option(s) of $(basename "$frag") (dependencies missing or misspelt?)"
	fi
}

if [[ -f $KDIR/vmlinux && -x $KDIR/gen_init_cpio ]]; then
	step "kernel: cache hit $KDIR"
	touch -- "$KDIR"
else
	vtag=${KVERSION//[^A-Za-z0-9.+-]/_}
	SRC=$CACHE/build/$KPKG-$vtag
	OBJ=$CACHE/build/obj-$vtag
	# Trees of other source versions are of no further use (1.7 GiB each).
	for d in "$CACHE/build/$KPKG-"* "$CACHE/build/obj-"*; do
		[[ -d $d && $d != "$SRC" && $d != "$OBJ" ]] || continue
		step "kernel: removing stale build tree $d"
		rm -rf -- "$d"
	done
	LOG=$CACHE/build/kernel-$KHASH.log
	# The tree is reused while husk's patches are the same; other patches
	# need a pristine tree, so it is extracted again.
	PHASH=$(cat "$HERE"/patches/*.patch | sha)
	if [[ $(cat "$SRC/.husk-extracted" 2>/dev/null) != "$PHASH" ]]; then
		step "kernel: extracting $KTARBALL ($KVERSION) into $SRC"
		rm -rf -- "$SRC"
		mkdir -p -- "$SRC"
		tar -xJf "$KTARBALL" -C "$SRC" --strip-components=1
		for patch in "$HERE"/patches/*.patch; do
			step "kernel: applying $(basename -- "$patch")"
			patch -d "$SRC" -p1 --quiet --forward <"$patch" >>"$CACHE/build/patch.log" 2>&1 ||
				die "kernel: $(basename -- "$patch") does not apply to $KPKG $KVERSION"
		done
		echo "$PHASH" >"$SRC/.husk-extracted"
	fi
	mkdir -p -- "$OBJ"
	: >"$LOG"
	# Reproducible: no user, host or date of this machine in the kernel; the date
	# is the source package's (dpkg keeps the tarball's mtime from the .deb).
	build_date=$(LC_ALL=C date -u -d "@$(stat -c %Y "$KTARBALL")")
	kmake() {
		make -C "$SRC" O="$OBJ" KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk \
			KBUILD_BUILD_TIMESTAMP="$build_date" KBUILD_BUILD_VERSION=1 "$@" >>"$LOG" 2>&1 || {
			tail -n 40 "$LOG" >&2
			die "kernel: make $* failed (full log: $LOG)"
		}
	}
	step "kernel: configuring (tinyconfig + husk.config)"
	kmake tinyconfig
	(cd "$SRC" && scripts/kconfig/merge_config.sh -n -O "$OBJ" "$OBJ/.config" "$HERE/husk.config") >>"$LOG" 2>&1 || {
		tail -n 40 "$LOG" >&2
		die "kernel: merge_config.sh failed (full log: $LOG)"
	}
	kmake olddefconfig
	verify_config "$HERE/husk.config" "$OBJ/.config"
	step "kernel: building vmlinux with make -j$(nproc) (log: $LOG)"
	kmake -j"$(nproc)" vmlinux
	# The kernel's own cpio writer (used for the initramfs, below) needs no root.
	cc -O2 -o "$OBJ/gen_init_cpio" "$SRC/usr/gen_init_cpio.c" >>"$LOG" 2>&1 ||
		die "kernel: compiling usr/gen_init_cpio.c failed (full log: $LOG)"
	release=$(make -s -C "$SRC" O="$OBJ" kernelrelease 2>/dev/null)
	rm -rf -- "$KDIR.tmp"
	mkdir -p -- "$KDIR.tmp"
	cp -- "$OBJ/vmlinux" "$OBJ/System.map" "$OBJ/gen_init_cpio" "$KDIR.tmp/"
	cp -- "$OBJ/.config" "$KDIR.tmp/config"
	echo "$release" >"$KDIR.tmp/release"
	rm -rf -- "$KDIR"
	mv -- "$KDIR.tmp" "$KDIR"
	step "kernel: built $release, cached in $KDIR"
fi

# --- 3. Agent -------------------------------------------------------------------
# The `guest` profile (Cargo.toml) trades speed for size: on PVM hosts each
# MiB of /init is seconds of boot.
step "agent: cargo build --profile guest --target $RUST_TARGET -p husk-agent (static)"
(cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
	cargo build --quiet --profile guest --target "$RUST_TARGET" -p husk-agent) ||
	die "agent: cargo build failed"
AGENT=$TARGET_DIR/$RUST_TARGET/guest/husk-agent
[[ -x $AGENT ]] || die "agent: $AGENT was not produced"
phdrs=$(LC_ALL=C readelf -lW "$AGENT") || die "agent: $AGENT is not an ELF file"
if grep -q 'INTERP' <<<"$phdrs"; then
	die "agent: $AGENT is dynamically linked; /init must be static"
fi

# --- 4. Initramfs ---------------------------------------------------------------
# gzip at level 0 (stored blocks): still the .cpio.gz every loader takes, but
# inflating it is a copy. At -9 inflate runs ~17 instructions per unpacked
# byte in guest kernel mode, which PVM emulates: ~72 M instructions, most of a
# PVM boot. Measured against a plain cpio, stored gzip costs ~3 s there. See
# README.md.
IHASH=$({
	sha256sum <"$AGENT"
	sha256sum <"$HERE/build.sh"
} | sha)
INITRAMFS=$CACHE/guest/initramfs-$IHASH.cpio.gz
if [[ -f $INITRAMFS ]]; then
	step "initramfs: cache hit $INITRAMFS"
	touch -- "$INITRAMFS"
else
	step "initramfs: packing $AGENT as /init"
	[[ $AGENT != *[[:space:]]* ]] || die "initramfs: agent path contains whitespace: $AGENT"
	list=$(mktemp)
	cpio_tmp=$(mktemp)
	cat >"$list" <<-EOF
		# The kernel opens /dev/console for init's stdio before anything is mounted.
		dir /dev 0755 0 0
		nod /dev/console 0600 0 0 c 5 1
		nod /dev/null 0666 0 0 c 1 3
		# Mount points for the agent (cgroup2 goes on /sys/fs/cgroup inside sysfs).
		dir /proc 0555 0 0
		dir /sys 0555 0 0
		dir /run 0755 0 0
		dir /tmp 1777 0 0
		file /init $AGENT 0755 0 0
	EOF
	# mtime 0 everywhere: the archive depends only on the agent binary.
	"$KDIR/gen_init_cpio" -t 0 "$list" >"$cpio_tmp" || die "initramfs: gen_init_cpio failed"
	rm -f -- "$list"
	listing=$(cpio -it --quiet <"$cpio_tmp")
	for f in init dev/console dev/null proc sys run tmp; do
		grep -qx "$f" <<<"$listing" || die "initramfs: $f missing from the archive"
	done
	# gzip(1) stops at level 1; Python's zlib writes stored blocks at level 0.
	python3 -c 'import gzip, sys; sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read(), compresslevel=0, mtime=0))' \
		<"$cpio_tmp" >"$INITRAMFS.tmp" || die "initramfs: gzip failed"
	rm -f -- "$cpio_tmp"
	mv -- "$INITRAMFS.tmp" "$INITRAMFS"
fi

# Keep the cache bounded: the newest few kernels and initramfs (one per agent
# build, so they pile up during development); kernel build logs go with them.
prune() {
	local keep=$1 old
	shift
	(($# > keep)) || return 0
	ls -1dt -- "$@" | tail -n +"$((keep + 1))" | while read -r old; do
		rm -rf -- "$old" "$CACHE/build/$(basename -- "$old").log"
	done
}
shopt -s nullglob
prune 4 "$CACHE"/guest/kernel-*[0-9a-f]
prune 8 "$CACHE"/guest/initramfs-*.cpio.gz
shopt -u nullglob

# --- 5. Install into target/guest -----------------------------------------------
mkdir -p -- "$OUT"
rm -f -- "$OUT/initramfs.cpio" # no longer built; never leave a stale one beside the real one
install_file() { cp -- "$1" "$OUT/.$2.tmp" && mv -f -- "$OUT/.$2.tmp" "$OUT/$2"; }
install_file "$KDIR/vmlinux" vmlinux
install_file "$KDIR/System.map" System.map
install_file "$KDIR/config" kernel.config
install_file "$INITRAMFS" initramfs.cpio.gz
step "done: kernel $(cat "$KDIR/release")"
for f in vmlinux initramfs.cpio.gz System.map kernel.config; do
	printf '  %-48s %s\n' "$OUT/$f" "$(size_of "$OUT/$f")"
done
