package verbs

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// DMA is memory outside the Go heap, mapped anonymous and private, for
// buffers that get registered as memory regions. The garbage collector
// neither moves nor frees it, and cgo providers may hand it to the kernel.
type DMA struct {
	mu  sync.Mutex
	mem []byte // the whole mapping, nil once freed
	n   int
}

// AllocDMA maps n bytes (rounded up to whole pages), zero-filled.
func AllocDMA(n int) (*DMA, error) {
	if n <= 0 || n > 1<<40 {
		return nil, fmt.Errorf("%w: DMA size %d", ErrInvalid, n)
	}
	page := os.Getpagesize()
	size := (n + page - 1) / page * page
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("verbs: mmap %d bytes: %w", size, err)
	}
	return &DMA{mem: mem, n: n}, nil
}

// Bytes returns the n bytes asked for, or nil after Close.
func (d *DMA) Bytes() []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mem == nil {
		return nil
	}
	return d.mem[:d.n:d.n]
}

// Len returns the size asked for.
func (d *DMA) Len() int { return d.n }

// Close unmaps the memory. Every memory region over it must be closed first:
// the memory is gone afterwards. Idempotent.
func (d *DMA) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mem == nil {
		return nil
	}
	err := unix.Munmap(d.mem)
	d.mem = nil
	if err != nil {
		return fmt.Errorf("verbs: munmap: %w", err)
	}
	return nil
}
