package images

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// x86 boot protocol offsets in a bzImage (Documentation/arch/x86/boot.rst).
const (
	bootSetupSects    = 0x1f1 // u8: setup sectors (0 means 4)
	bootHeaderMagic   = 0x202 // "HdrS"
	bootVersion       = 0x206 // u16: protocol version
	bootPayloadOffset = 0x248 // u32: payload offset from the protected-mode code (2.08+)
	bootPayloadLength = 0x24c // u32
)

// ErrKernelImage reports a kernel image that cannot be decompressed here.
var ErrKernelImage = errors.New("images: unsupported kernel image")

// Payload returns the compressed kernel stream inside a bzImage, located
// through the boot protocol header, the name of its compressor ("xz",
// "gzip", "zstd") and the decompressed size (the kernel build appends it to
// the stream as a little-endian u32).
func Payload(bz []byte) ([]byte, string, uint32, error) {
	if len(bz) < 0x250 || string(bz[bootHeaderMagic:bootHeaderMagic+4]) != "HdrS" {
		return nil, "", 0, fmt.Errorf("%w: no bzImage header", ErrKernelImage)
	}
	if v := binary.LittleEndian.Uint16(bz[bootVersion:]); v < 0x208 {
		return nil, "", 0, fmt.Errorf("%w: boot protocol %#x lacks payload fields", ErrKernelImage, v)
	}
	sects := int(bz[bootSetupSects])
	if sects == 0 {
		sects = 4
	}
	base := uint64(sects+1) * 512
	off := base + uint64(binary.LittleEndian.Uint32(bz[bootPayloadOffset:]))
	n := uint64(binary.LittleEndian.Uint32(bz[bootPayloadLength:]))
	if off+n > uint64(len(bz)) || n < 16 {
		return nil, "", 0, fmt.Errorf("%w: payload [%d, +%d) outside the %d-byte image", ErrKernelImage, off, n, len(bz))
	}
	p := bz[off : off+n-4]
	size := binary.LittleEndian.Uint32(bz[off+n-4:])
	switch {
	case bytes.HasPrefix(p, []byte("\xfd7zXZ\x00")):
		return p, "xz", size, nil
	case bytes.HasPrefix(p, []byte{0x1f, 0x8b}):
		return p, "gzip", size, nil
	case bytes.HasPrefix(p, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return p, "zstd", size, nil
	}
	return nil, "", 0, fmt.Errorf("%w: unknown compression (magic % x)", ErrKernelImage, p[:6])
}

// ExtractELF decompresses the kernel inside the bzImage src with the host's
// decompressor (xz, gzip or zstd) and writes the ELF vmlinux to dst.
func ExtractELF(ctx context.Context, src, dst string) error {
	bz, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	payload, tool, size, err := Payload(bz)
	if err != nil {
		return err
	}
	out, err := os.CreateTemp(filepath.Dir(dst), ".tmp-vmlinux-")
	if err != nil {
		return err
	}
	defer os.Remove(out.Name())
	cmd := exec.CommandContext(ctx, tool, "-dc")
	cmd.Stdin = bytes.NewReader(payload)
	cmd.Stdout = out
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return &ToolError{Tool: tool, Args: []string{"-dc"}, Output: tail(stderr.Bytes(), 2048), Err: err}
	}
	if st, err := os.Stat(out.Name()); err != nil || st.Size() != int64(size) {
		return fmt.Errorf("%w: decompressed kernel is not %d bytes (%v)", ErrKernelImage, size, err)
	}
	f, err := elf.Open(out.Name())
	if err != nil {
		return fmt.Errorf("%w: decompressed kernel is not ELF: %v", ErrKernelImage, err)
	}
	f.Close()
	if err := os.Chmod(out.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(out.Name(), dst)
}
