#!/bin/sh
# Turns the build's qcow2 into a streamOptimized VMDK and an OVA (descriptor, manifest, disk), plus SHA256SUMS.
#
# Run on the build host by the build's post-processor; by hand, after a build:
#   OUTPUT_DIR=build/image VM_NAME=scaigrid-appliance CPUS=2 MEMORY_MB=4096 \
#       OVF_TEMPLATE=packer/ova/appliance.ovf.in packer/scripts/make-ova.sh
set -eu

: "${OUTPUT_DIR:?}" "${VM_NAME:?}" "${CPUS:?}" "${MEMORY_MB:?}" "${OVF_TEMPLATE:?}"
template=$(readlink -f "$OVF_TEMPLATE")
cd "$OUTPUT_DIR"
qcow2=$VM_NAME.qcow2
vmdk=$VM_NAME.vmdk
ovf=$VM_NAME.ovf
manifest=$VM_NAME.mf

echo "make-ova: $vmdk"
rm -f "$vmdk"
# streamOptimized is the VMDK flavour OVAs carry; the adapter matches the OVF's LSI Logic controller, and
# compat6 writes the descriptor version VMware's importers expect.
qemu-img convert -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic,compat6=on "$qcow2" "$vmdk"

disk_bytes=$(qemu-img info --output=json "$qcow2" | sed -n 's/^ *"virtual-size": \([0-9]*\),*$/\1/p' | head -n 1)
[ -n "$disk_bytes" ] || { echo "make-ova: no virtual size in qemu-img info of $qcow2" >&2; exit 1; }
vmdk_bytes=$(stat -c %s "$vmdk")

echo "make-ova: $ovf"
sed -e "s/@VM_NAME@/$VM_NAME/g" -e "s/@CPUS@/$CPUS/g" -e "s/@MEMORY_MB@/$MEMORY_MB/g" \
    -e "s/@DISK_BYTES@/$disk_bytes/g" -e "s/@VMDK_BYTES@/$vmdk_bytes/g" "$template" >"$ovf"
if grep -q '@[A-Z_]*@' "$ovf"; then
    echo "make-ova: placeholders left in $ovf: $(grep -o '@[A-Z_]*@' "$ovf" | sort -u | tr '\n' ' ')" >&2
    exit 1
fi

# The manifest lets the importing hypervisor verify both files; OVF 1.0 readers accept SHA256 lines.
sha256sum "$ovf" "$vmdk" | awk '{ print "SHA256(" $2 ")= " $1 }' >"$manifest"

echo "make-ova: $VM_NAME.ova"
# The OVF specification wants a ustar archive with the descriptor first and the manifest next.
tar --format=ustar -cf "$VM_NAME.ova" "$ovf" "$manifest" "$vmdk"

sha256sum "$qcow2" "$vmdk" "$VM_NAME.ova" >SHA256SUMS
echo "make-ova: done; $(pwd)/SHA256SUMS lists the images"
