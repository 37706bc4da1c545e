package virtiofs_test

import (
	"fmt"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/vhost/virtiofs"
	"github.com/vsdp/vsdp/vhost/virtiofs/virtiofstest"
)

// BenchmarkVirtiofsRead reads a file through the device over the fake
// front-end (one FUSE READ per iteration, the reply room split into 4 KiB
// descriptors as the guest driver posts pages), beside copy() of the same
// size.
func BenchmarkVirtiofsRead(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20} {
		name := fmt.Sprintf("%dKiB", size>>10)
		if size >= 1<<20 {
			name = fmt.Sprintf("%dMiB", size>>20)
		}
		b.Run(name+"/device", func(b *testing.B) {
			content := make([]byte, size)
			for i := range content {
				content[i] = byte(i * 7)
			}
			r := newRig(b, virtiofstest.NewMemFS(map[string][]byte{"data": content}, nil), virtiofs.Options{},
				virtiofstest.Options{Seg: 4096})
			r.init()
			node := r.lookup(fuse.FUSE_ROOT_ID, "data")
			oo, err := r.c.Open(node, syscall.O_RDONLY)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(size))
			b.ResetTimer()
			for range b.N {
				got, err := r.c.Read(node, oo.Fh, 0, size)
				if err != nil || len(got) != size {
					b.Fatalf("read %d bytes: %v", len(got), err)
				}
			}
		})
		b.Run(name+"/baseline-memcpy", func(b *testing.B) {
			src, dst := make([]byte, size), make([]byte, size)
			b.SetBytes(int64(size))
			for range b.N {
				copy(dst, src)
			}
		})
	}
}
