package echo

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/virtq"
)

// Queue indices.
const (
	RX = 0 // device to driver: device-writable buffers
	TX = 1 // driver to device: device-readable buffers
)

// DefaultBudget is the number of chains one Kick handles at most.
const DefaultBudget = 256

// Options configure a Device. The zero value is a device without config
// space that accepts rings of up to 32768 entries.
type Options struct {
	// Config is the initial config space (nil: none). SET_CONFIG may
	// rewrite it within its length.
	Config []byte
	// MaxQueueSize bounds SET_VRING_NUM (0: 32768).
	MaxQueueSize uint32
	// Budget bounds the chains one Kick pops (0: DefaultBudget).
	Budget int
}

// Stats count a device's work.
type Stats struct {
	Messages uint64 // TX chains echoed completely
	Bytes    uint64 // payload bytes copied
	RxChains uint64 // RX chains filled
}

// Device is the echo device. It implements vhost.Device.
type Device struct {
	opts Options

	mu        sync.Mutex
	rx, tx    *virtq.Queue
	cur       *virtq.Chain // TX chain being copied
	rd        virtq.Reader
	features  uint64
	config    []byte
	segs      [][]byte
	closed    bool
	unflushed [2]int // pushes since the last Flush, per queue

	messages, bytes, rxChains atomic.Uint64
}

// New returns a device.
func New(o Options) *Device {
	if o.Budget <= 0 {
		o.Budget = DefaultBudget
	}
	return &Device{opts: o, config: append([]byte(nil), o.Config...)}
}

// Factory returns a vhost.Factory making one device per front-end; each new
// device is also passed to created, if not nil (for tests).
func Factory(o Options, created func(*Device)) vhost.Factory {
	return func() (vhost.Device, error) {
		d := New(o)
		if created != nil {
			created(d)
		}
		return d, nil
	}
}

// Stats returns the counters.
func (d *Device) Stats() Stats {
	return Stats{Messages: d.messages.Load(), Bytes: d.bytes.Load(), RxChains: d.rxChains.Load()}
}

// Features returns the features last acked.
func (d *Device) Features() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.features
}

// Info implements vhost.Device.
func (d *Device) Info() vhost.Info {
	return vhost.Info{Name: "echo", Queues: 2, MaxQueueSize: d.opts.MaxQueueSize, Config: len(d.opts.Config) > 0}
}

// SetFeatures implements vhost.Device.
func (d *Device) SetFeatures(f uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.features = f
	return nil
}

var errConfig = errors.New("echo: config access out of range")

// GetConfig implements vhost.Device.
func (d *Device) GetConfig(offset uint32, buf []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if uint64(offset)+uint64(len(buf)) > uint64(len(d.config)) {
		return fmt.Errorf("%w: [%d, +%d) of %d bytes", errConfig, offset, len(buf), len(d.config))
	}
	copy(buf, d.config[offset:])
	return nil
}

// SetConfig implements vhost.Device.
func (d *Device) SetConfig(offset uint32, data []byte, flags uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if uint64(offset)+uint64(len(data)) > uint64(len(d.config)) {
		return fmt.Errorf("%w: [%d, +%d) of %d bytes", errConfig, offset, len(data), len(d.config))
	}
	copy(d.config[offset:], data)
	return nil
}

// QueueStart implements vhost.Device.
func (d *Device) QueueStart(index int, q *virtq.Queue) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.closed:
		return errors.New("echo: device closed")
	case index == RX:
		d.rx = q
	case index == TX:
		d.tx = q
	default:
		return fmt.Errorf("echo: no queue %d", index)
	}
	return nil
}

// QueueStop implements vhost.Device. A TX message cut short is given back
// to the driver as used.
func (d *Device) QueueStop(index int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch index {
	case RX:
		d.rx = nil
	case TX:
		d.dropCurrent()
		d.tx = nil
	}
}

func (d *Device) dropCurrent() {
	if d.cur != nil {
		_ = d.tx.Push(d.cur, 0)
		_ = d.tx.Flush()
		d.cur, d.rd = nil, virtq.Reader{}
	}
}

// Reset implements vhost.Device.
func (d *Device) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.tx != nil {
		d.dropCurrent()
	}
	d.rx, d.tx = nil, nil
	d.features = 0
	d.config = append(d.config[:0], d.opts.Config...)
}

// Close implements vhost.Device.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	d.rx, d.tx, d.cur = nil, nil, nil
	return nil
}

// Kick implements vhost.Device: either ring's kick resumes the copy.
func (d *Device) Kick(index int) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.rx == nil || d.tx == nil {
		return false, nil
	}
	more, err := d.pump()
	// Publish what was done even when a ring broke: the other may be fine.
	ferr := errors.Join(d.rx.Flush(), d.tx.Flush())
	d.unflushed = [2]int{}
	if err == nil {
		err = ferr
	}
	return more && err == nil, err
}

// push gives a chain back and flushes every half ring of pushes. virtq
// publishes by itself when a whole ring's worth is pending, but then drops
// the interrupt decision, which with EVENT_IDX loses the interrupt for
// good; flushing earlier keeps that path unused.
func (d *Device) push(q *virtq.Queue, i int, c *virtq.Chain, n int) error {
	if err := q.Push(c, n); err != nil {
		return err
	}
	d.unflushed[i]++
	if d.unflushed[i] >= max(int(q.Size())/2, 1) {
		d.unflushed[i] = 0
		return q.Flush()
	}
	return nil
}

// pump copies TX messages into RX chains until one ring runs dry or the
// budget is spent (more is then true). Caller holds d.mu.
func (d *Device) pump() (more bool, err error) {
	for budget := d.opts.Budget; ; {
		if budget == 0 {
			return true, nil
		}
		if d.cur == nil {
			c, err := d.tx.Pop()
			if err != nil {
				return false, err
			}
			if c == nil {
				if d.tx.EnableNotify() {
					continue // the driver added chains meanwhile
				}
				return false, nil
			}
			budget--
			d.cur, d.rd = c, c.Reader()
		}
		rc, err := d.rx.Pop()
		if err != nil {
			return false, err
		}
		if rc == nil {
			if d.rx.EnableNotify() {
				continue
			}
			return false, nil // back-pressure: wait for an RX kick
		}
		budget--
		w := rc.Writer()
		d.segs = d.rd.Slices(d.segs[:0], w.Available())
		for _, s := range d.segs {
			_, _ = w.Write(s) // cannot be short: the slices fit Available
		}
		clear(d.segs)
		n := w.Written()
		d.bytes.Add(uint64(n))
		d.rxChains.Add(1)
		if err := d.push(d.rx, RX, rc, n); err != nil {
			return false, err
		}
		if d.rd.Remaining() == 0 {
			c := d.cur
			d.cur, d.rd = nil, virtq.Reader{}
			d.messages.Add(1)
			if err := d.push(d.tx, TX, c, 0); err != nil {
				return false, err
			}
		}
	}
}
