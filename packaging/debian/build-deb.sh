#!/usr/bin/env bash
# Builds target/debian/airlock_VERSION_ARCH.deb from a release build of the workspace, with
# dpkg-deb (no extra tooling: dpkg is on every Debian machine, and the maintainer scripts,
# conffile and layout below are all there is to review). Prints the package's path.
#
#   packaging/debian/build-deb.sh [--no-build] [--version V]
#
# --no-build reuses target/release. --version V (or AIRLOCK_DEB_VERSION=V) sets the package's
# version instead of Cargo.toml's, e.g. a lower one to test upgrades from the same tree; the
# package is then target/debian/airlock_V_ARCH.deb. Depends is computed by dpkg-shlibdeps (from
# dpkg-dev) from the binaries' ELF dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=packaging/debian
build=1
version=${AIRLOCK_DEB_VERSION:-}
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0; shift ;;
    --version) [ $# -ge 2 ] || { echo "build-deb: --version needs a value" >&2; exit 2; }; version=$2; shift 2 ;;
    *) echo "usage: build-deb.sh [--no-build] [--version V]" >&2; exit 2 ;;
  esac
done
[ -n "$version" ] || version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
[ -n "$version" ] || { echo "build-deb: no version in Cargo.toml" >&2; exit 1; }
[[ $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || { echo "build-deb: '$version' is not a Debian version" >&2; exit 2; }
command -v dpkg-shlibdeps >/dev/null || { echo "build-deb: needs dpkg-shlibdeps (apt-get install dpkg-dev)" >&2; exit 1; }
if [ $build = 1 ]; then
  cargo build --release --locked --workspace --bins >&2
fi
rel=target/release
workers=(plcsim field logic historian auth ui bridge)
root=target/debian/root
rm -rf "$root"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/libexec/airlock" "$root/usr/share/airlock/policies/common" \
  "$root/etc/airlock" "$root/usr/lib/systemd/system" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" \
  "$root/usr/share/man/man8" "$root/usr/share/doc/airlock"

install -m 0755 "$rel/airlockd" "$rel/airlock" "$root/usr/bin/"
for w in "${workers[@]}"; do install -m 0755 "$rel/airlock-worker-$w" "$root/usr/libexec/airlock/"; done
install -m 0755 "$rel/airlock-hmi" "$root/usr/bin/"
# Symbols stay in the build tree; the package ships stripped binaries.
strip --strip-unneeded --remove-section=.comment "$root"/usr/bin/* "$root"/usr/libexec/airlock/*

# The policies as auditors read them (`airlock policy audit --dir /usr/share/airlock/policies`).
find policies -maxdepth 1 -name "*.toml" ! -name Cargo.toml -exec install -m 0644 {} "$root/usr/share/airlock/policies/" \;
install -m 0644 policies/common/*.toml "$root/usr/share/airlock/policies/common/"

# The configuration (a conffile): the embedded default, with the workers in /usr/libexec, the
# HMI's socket from airlockd.socket (the units run with no network of their own), and every
# confinement layer `required`: a layer the host cannot give stops that worker, unless the
# operator downgrades it on the command line (as airlockd.service does for `uid` and
# `mount-namespace`, which no unprivileged supervisor can give).
"$rel/airlockd" --print-default-config | perl -0pe '
  s/^\[supervisor\]\n/[supervisor]\nworker-directory = "\/usr\/libexec\/airlock"\n/m or die "no [supervisor]";
  s/(\[defaults\.confinement\]\n(?:[a-z-]+ = "[a-z-]+"\n)+)/$1 =~ s{"best-effort"}{"required"}gr/e or die "no [defaults.confinement]";
  s/Layers that need privilege .*?itself are required\. (For a real device, see docs\/hmi\.md\.)/In this packaged file every\n# confinement layer is required: a layer the host cannot give stops that worker (see\n# \/usr\/share\/doc\/airlock\/deployment.md). $1/s or die "no header";
  s/\[\[worker\.resource\]\]\nkind = "tcp-listen"\naddress = "127\.0\.0\.1:8080"\n/[[worker.resource]]\n# passed by airlockd.socket (FileDescriptorName=hmi)\nkind = "systemd-socket"\nname = "hmi"\n/ or die "no ui listener";
  s/^# airlockd.s embedded default configuration.*?\n/# \/etc\/airlock\/airlock.toml: airlockd configuration (see airlockd(8), \/usr\/share\/doc\/airlock).\n/m;
' >"$root/etc/airlock/airlock.toml"
chmod 0644 "$root/etc/airlock/airlock.toml"
"$rel/airlockd" --check-config "$root/etc/airlock/airlock.toml" >&2
# Checked as TOML, not as text: every confinement table, defaults and per worker, says
# required for every layer it names (a layer not named is required too).
python3 - "$root/etc/airlock/airlock.toml" <<'PY' || exit 1
import sys, tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))
tables = [("defaults", cfg.get("defaults", {}).get("confinement", {}))]
tables += [(w.get("name", "?"), w.get("confinement", {})) for w in cfg.get("worker", [])]
bad = [f"{who}: {layer} = {v!r}" for who, t in tables for layer, v in t.items() if v != "required"]
if bad:
    sys.exit("the packaged configuration must mark every layer required: " + "; ".join(bad))
PY

install -m 0644 packaging/systemd/airlockd.service packaging/systemd/airlockd-privileged.service \
  packaging/systemd/airlockd.socket "$root/usr/lib/systemd/system/"
install -m 0644 "$here/sysusers.conf" "$root/usr/lib/sysusers.d/airlock.conf"
install -m 0644 "$here/tmpfiles.conf" "$root/usr/lib/tmpfiles.d/airlock.conf"

# Man pages from the binaries' own command-line definitions.
"$rel/airlock-mangen" "$root/usr/share/man/man8" >/dev/null
"$rel/airlock-hmi" man "$root/usr/share/man/man8"
gzip -9n "$root"/usr/share/man/man8/*.8

install -m 0644 "$here/copyright" "$root/usr/share/doc/airlock/copyright"
# The tags lintian reports that are not fixed here, each with its reason (packaging/debian/lintian-overrides).
install -d "$root/usr/share/lintian/overrides"
install -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/airlock"
install -m 0644 README.md "$root/usr/share/doc/airlock/README.md"
for d in configuration deployment hmi policies; do
  [ -f "docs/$d.md" ] && install -m 0644 "docs/$d.md" "$root/usr/share/doc/airlock/$d.md"
done
printf 'airlock (%s) unstable; urgency=medium\n\n  * Built from the airlock workspace.\n\n -- airlock maintainers <maintainers@airlock.invalid>  %s\n' \
  "$version" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" |
  gzip -9n >"$root/usr/share/doc/airlock/changelog.gz" # a native package: changelog.gz, not changelog.Debian.gz

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
# Depends from the shipped binaries' shared libraries (and the symbol versions they use), as
# dh_shlibdeps would: dpkg-shlibdeps wants a debian/control, so it runs in a scratch directory.
shlib=$(mktemp -d)
trap 'rm -rf "$shlib"' EXIT
mkdir "$shlib/debian"
printf 'Source: airlock\n\nPackage: airlock\nArchitecture: any\n' >"$shlib/debian/control"
abs=$(pwd)/$root
depends=$(cd "$shlib" && dpkg-shlibdeps -O "$abs"/usr/bin/* "$abs"/usr/libexec/airlock/* |
  sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "build-deb: dpkg-shlibdeps computed no Depends" >&2; exit 1; }
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
  "$here/control.in" >"$root/DEBIAN/control"
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

out=target/debian/airlock_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >&2
echo "$out"
