package vsocktest

// Queue is a byte queue for the back-end side of a test stream (a
// vsock.Stream): Append adds what Deliver got, Fill hands bytes from the
// front to Pull. It has no lock: the stream that holds it locks around it.
// The zero value is an empty queue.
type Queue struct{ b []byte }

// Append adds the bytes of segs at the back.
func (q *Queue) Append(segs ...[]byte) {
	for _, s := range segs {
		q.b = append(q.b, s...)
	}
}

// Fill moves bytes from the front into dst's buffers in order and returns
// how many it moved.
func (q *Queue) Fill(dst [][]byte) int {
	n := 0
	for _, d := range dst {
		k := copy(d, q.b)
		q.b = q.b[k:]
		n += k
	}
	return n
}

// Len returns how many bytes wait in the queue.
func (q *Queue) Len() int { return len(q.b) }
