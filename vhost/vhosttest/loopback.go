package vhosttest

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Loopback drives a loopback device (one that returns every TX message in
// RX chains, like vhost/echo) as a guest would: it keeps RX stocked with
// buffers, sends messages on TX split into random descriptors, reaps both
// rings, and sleeps on the call eventfds in between. Run stops by itself:
// when everything came back, or with an error when no interrupt arrives for
// Stall (a lost interrupt or a dead device) or Abort is closed.
type Loopback struct {
	RX, TX   *Queue
	RxSize   int           // bytes per RX buffer
	RxLimit  int           // most RX buffers outstanding (0: the ring's size)
	MaxSegs  int           // each TX message is split into 1..MaxSegs descriptors
	Indirect bool          // post chains through indirect tables
	Stall    time.Duration // 0: DefaultTimeout
	Keep     bool          // return each RX chain's data separately
	Rand     *rand.Rand    // splits (nil: a fixed seed)
	Abort    <-chan struct{}

	// Progress, readable after Run.
	Sent, Completed, Chains, Bytes int
}

// ErrAborted: Loopback.Abort was closed.
var ErrAborted = errors.New("vhosttest: traffic aborted")

func (l *Loopback) add(q *Queue, out [][]byte, in []int) error {
	if l.Indirect {
		_, err := q.AddIndirect(out, in)
		return err
	}
	_, err := q.Add(out, in)
	return err
}

// Run sends msgs and returns what came back: one slice per RX chain with
// Keep, else the concatenated stream as the only element.
func (l *Loopback) Run(msgs [][]byte) ([][]byte, error) {
	rx, tx := l.RX, l.TX
	stall := l.Stall
	if stall == 0 {
		stall = DefaultTimeout
	}
	rng := l.Rand
	if rng == nil {
		rng = rand.New(rand.NewPCG(1, 1))
	}
	total := 0
	for _, m := range msgs {
		total += len(m)
	}
	rxLimit := l.RxLimit
	if rxLimit == 0 {
		rxLimit = int(rx.Size())
	}
	var recv [][]byte
	var stream []byte
	next := 0
	for next < len(msgs) || l.Completed < len(msgs) || l.Bytes < total {
		select {
		case <-l.Abort:
			return nil, ErrAborted
		default:
		}
		for rx.Outstanding() < rxLimit {
			if err := l.add(rx, nil, []int{l.RxSize}); err != nil {
				if errors.Is(err, ErrRingFull) {
					break
				}
				return nil, err
			}
		}
		if err := rx.Notify(false); err != nil {
			return nil, err
		}
		for next < len(msgs) {
			m := msgs[next]
			k := 1
			if l.MaxSegs > 1 && len(m) > 1 {
				k = 1 + rng.IntN(min(l.MaxSegs, len(m)))
			}
			if err := l.add(tx, Split(m, k, rng), nil); err != nil {
				if errors.Is(err, ErrRingFull) {
					break
				}
				return nil, err
			}
			next++
			l.Sent++
		}
		if err := tx.Notify(false); err != nil {
			return nil, err
		}
		progressed := false
		for {
			_, ok, err := tx.Used()
			if err != nil {
				return nil, err
			}
			if !ok {
				break
			}
			l.Completed++
			progressed = true
		}
		for {
			e, ok, err := rx.Used()
			if err != nil {
				return nil, err
			}
			if !ok {
				break
			}
			if int(e.Len) > l.RxSize {
				return nil, fmt.Errorf("vhosttest: rx chain %d used len %d exceeds its %d bytes", e.Head, e.Len, l.RxSize)
			}
			l.Chains++
			l.Bytes += int(e.Len)
			if l.Keep {
				recv = append(recv, e.Data)
			} else {
				stream = append(stream, e.Data...)
			}
			progressed = true
		}
		if l.Bytes > total || l.Completed > len(msgs) {
			return nil, fmt.Errorf("vhosttest: received %d bytes and %d completions for %d bytes in %d messages", l.Bytes, l.Completed, total, len(msgs))
		}
		if progressed {
			continue
		}
		ok, err := WaitCalls(stall, rx, tx)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("vhosttest: stalled: no interrupt for %v; sent %d/%d messages (%d completed), received %d/%d bytes, rx used idx %d, tx used idx %d",
				stall, next, len(msgs), l.Completed, l.Bytes, total, rx.UsedIdx(), tx.UsedIdx())
		}
	}
	if !l.Keep {
		recv = [][]byte{stream}
	}
	return recv, nil
}

// Split cuts m into k non-empty pieces at random points (k is capped at
// len(m)).
func Split(m []byte, k int, rng *rand.Rand) [][]byte {
	k = min(k, len(m))
	if k <= 1 {
		return [][]byte{m}
	}
	cuts := make(map[int]bool, k-1)
	for len(cuts) < k-1 {
		cuts[1+rng.IntN(len(m)-1)] = true
	}
	out := make([][]byte, 0, k)
	prev := 0
	for i := 1; i < len(m); i++ {
		if cuts[i] {
			out = append(out, m[prev:i])
			prev = i
		}
	}
	return append(out, m[prev:])
}

// RandomMessages returns n messages of random sizes in [minSize, maxSize]
// filled with random bytes.
func RandomMessages(rng *rand.Rand, n, minSize, maxSize int) [][]byte {
	msgs := make([][]byte, n)
	for i := range msgs {
		m := make([]byte, minSize+rng.IntN(maxSize-minSize+1))
		for j := 0; j < len(m); j += 8 {
			v := rng.Uint64()
			for k := j; k < min(j+8, len(m)); k++ {
				m[k] = byte(v)
				v >>= 8
			}
		}
		msgs[i] = m
	}
	return msgs
}

// Digest is the sha256 of the concatenated buffers.
func Digest(bufs ...[]byte) [32]byte {
	h := sha256.New()
	for _, b := range bufs {
		h.Write(b)
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}
