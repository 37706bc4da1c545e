package images

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// fakeBzImage wraps payload (a compressed stream plus the 4-byte size the
// kernel build appends) in a minimal bzImage header.
func fakeBzImage(payload []byte, size uint32) []byte {
	const sects = 3
	b := make([]byte, (sects+1)*512+64)
	b[bootSetupSects] = sects
	copy(b[bootHeaderMagic:], "HdrS")
	binary.LittleEndian.PutUint16(b[bootVersion:], 0x20f)
	binary.LittleEndian.PutUint32(b[bootPayloadOffset:], 64)
	binary.LittleEndian.PutUint32(b[bootPayloadLength:], uint32(len(payload)+4))
	b = append(b, payload...)
	b = binary.LittleEndian.AppendUint32(b, size)
	return append(b, "trailing junk"...)
}

func TestExtractELF(t *testing.T) {
	if _, err := exec.LookPath("gzip"); err != nil {
		t.Fatalf("gzip: %v", err)
	}
	elfData, err := os.ReadFile(DefaultBusybox) // any ELF file
	if err != nil {
		t.Fatal(err)
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(elfData)
	zw.Close()
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "vmlinux")
	os.WriteFile(src, fakeBzImage(z.Bytes(), uint32(len(elfData))), 0o644)
	if err := ExtractELF(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || sha256.Sum256(got) != sha256.Sum256(elfData) {
		t.Fatalf("extracted %d bytes with another hash (%v)", len(got), err)
	}

	// A wrong size trailer, and a non-ELF payload, are refused.
	os.WriteFile(src, fakeBzImage(z.Bytes(), 12), 0o644)
	if err := ExtractELF(context.Background(), src, dst+"2"); !errors.Is(err, ErrKernelImage) {
		t.Errorf("size mismatch: err %v", err)
	}
	z.Reset()
	zw = gzip.NewWriter(&z)
	zw.Write([]byte("not an elf"))
	zw.Close()
	os.WriteFile(src, fakeBzImage(z.Bytes(), 10), 0o644)
	if err := ExtractELF(context.Background(), src, dst+"3"); !errors.Is(err, ErrKernelImage) {
		t.Errorf("non-ELF: err %v", err)
	}
}

func TestPayloadRejects(t *testing.T) {
	good := fakeBzImage([]byte("\xfd7zXZ\x00rest-of-stream"), 1)
	if _, tool, _, err := Payload(good); err != nil || tool != "xz" {
		t.Fatalf("good image: %q, %v", tool, err)
	}
	mod := func(f func(b []byte)) []byte { b := append([]byte(nil), good...); f(b); return b }
	for name, b := range map[string][]byte{
		"short":        good[:100],
		"no HdrS":      mod(func(b []byte) { b[bootHeaderMagic] = 'X' }),
		"old protocol": mod(func(b []byte) { binary.LittleEndian.PutUint16(b[bootVersion:], 0x206) }),
		"past the end": mod(func(b []byte) { binary.LittleEndian.PutUint32(b[bootPayloadLength:], 1<<30) }),
		"unknown":      mod(func(b []byte) { b[(3+1)*512+64] = 'Q' }),
	} {
		if _, _, _, err := Payload(b); !errors.Is(err, ErrKernelImage) {
			t.Errorf("%s: err %v, want ErrKernelImage", name, err)
		}
	}
}
