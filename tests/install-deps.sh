#!/usr/bin/env bash
# Installs the host packages the test suite uses (Debian/Ubuntu, as root or
# through sudo). Installs nothing when every tool is already there.
#
#   gcc             builds the freestanding test guests (tests/build.rs)
#   lz4             cuts vmlinux out of Debian's cloud kernel bzImage
#   acpica-tools    iasl, disassembles the generated ACPI tables
#   strace          the seccomp tests trace the syscalls ember makes
#   qemu-system-x86 the TCG test host that runs real Linux under ember
#   busybox-static  the shell and tools of the test host and its guest
#   socat           TCP and vsock peers inside the test host and its guest
#   e2fsprogs       mkfs.ext4 -d builds guest disks; debugfs reads them back
#   cpio            packs the initramfs images
set -euo pipefail

# tool:package
needs=(
    gcc:gcc
    lz4:lz4
    iasl:acpica-tools
    strace:strace
    qemu-system-x86_64:qemu-system-x86
    busybox:busybox-static
    socat:socat
    mkfs.ext4:e2fsprogs
    debugfs:e2fsprogs
    cpio:cpio
)

missing=()
for need in "${needs[@]}"; do
    tool=${need%%:*}
    package=${need#*:}
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
        missing+=("$package")
    fi
done
# busybox must be the static build: it runs inside guests without libraries.
if command -v busybox >/dev/null && ldd "$(command -v busybox)" >/dev/null 2>&1; then
    missing+=(busybox-static)
fi

sudo=()
if ((EUID != 0)); then
    sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Linux tests fetch Debian's kernels with apt-get download.
if ! apt-cache show linux-image-cloud-amd64 linux-image-amd64 >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
fi
