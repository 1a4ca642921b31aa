// Package stream keeps the output of a process inside the kuasar-vmm guest
// until the host has acknowledged it. A Buffer is filled from the
// process's stream (a pipe or a terminal) by Fill and read by offset with
// Read, the agent's ReadStdio: asking for an offset acknowledges every byte
// before it, and only then is the byte dropped. A full Buffer stops
// reading its source, so the process blocks on its own write: nothing is
// lost while the host is away, however long.
package stream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// Defaults of a Buffer and of Read.
const (
	// DefaultLimit bounds the unacknowledged bytes of one stream.
	DefaultLimit = 1 << 20
	// DefaultWait is how long Read waits for output when there is none.
	DefaultWait = 10 * time.Second
	// DefaultMaxRead bounds one Read's data when the caller gives no bound.
	DefaultMaxRead = 64 << 10
	// MaxRead bounds one Read's data whatever the caller asks (the reply
	// must fit a ttrpc message).
	MaxRead = 1 << 20
	// chunk is the most Fill reads from its source at once.
	chunk = 32 << 10
)

// ErrClosed is returned by Read once the Buffer was closed (its process
// deleted).
var ErrClosed = errors.New("stream closed")

// Buffer holds the unacknowledged output of one stream.
type Buffer struct {
	limit int

	mu sync.Mutex
	// base is the stream offset of data[start].
	base  uint64
	data  []byte
	start int
	// eof: the source ended (Fill returned); closed: the buffer was
	// released (Close).
	eof    bool
	closed bool
	srcErr error
	// changed is closed and replaced whenever anything above changes.
	changed chan struct{}
}

// New returns an empty Buffer that keeps at most limit unacknowledged
// bytes (DefaultLimit if limit <= 0).
func New(limit int) *Buffer {
	if limit <= 0 {
		limit = DefaultLimit
	}
	return &Buffer{limit: limit, changed: make(chan struct{})}
}

// broadcast wakes every waiter; b.mu must be held.
func (b *Buffer) broadcast() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// pending is the number of unacknowledged bytes; b.mu must be held.
func (b *Buffer) pending() int { return len(b.data) - b.start }

// Fill copies src into the buffer until src ends (EOF or an error) or the
// buffer is closed. While the buffer is full it does not read src, so a
// process writing into src blocks. A read error other than EOF (EIO from a
// terminal whose last writer closed) also ends the stream: it is recorded
// and returned, and readers see the end of the stream.
func (b *Buffer) Fill(src io.Reader) error {
	buf := make([]byte, chunk)
	for {
		b.mu.Lock()
		for !b.closed && b.pending() >= b.limit {
			ch := b.changed
			b.mu.Unlock()
			<-ch
			b.mu.Lock()
		}
		if b.closed {
			b.mu.Unlock()
			return ErrClosed
		}
		room := min(b.limit-b.pending(), len(buf))
		b.mu.Unlock()

		n, err := src.Read(buf[:room])

		b.mu.Lock()
		if n > 0 && !b.closed {
			b.data = append(b.data, buf[:n]...)
			b.broadcast()
		}
		if err != nil {
			if b.closed {
				b.mu.Unlock()
				return ErrClosed
			}
			b.eof = true
			if !errors.Is(err, io.EOF) {
				b.srcErr = err
			}
			b.broadcast()
			b.mu.Unlock()
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		b.mu.Unlock()
	}
}

// End marks the stream ended without a source (a stream whose process
// never started, for instance).
func (b *Buffer) End() {
	b.mu.Lock()
	if !b.eof {
		b.eof = true
		b.broadcast()
	}
	b.mu.Unlock()
}

// Close releases the buffer: what it holds is dropped, Fill returns (once
// its source's pending read returns: close the source too) and Read fails
// with ErrClosed.
func (b *Buffer) Close() {
	b.mu.Lock()
	if !b.closed {
		b.closed = true
		b.data, b.start = nil, 0
		b.broadcast()
	}
	b.mu.Unlock()
}

// Chunk is the answer of Read.
type Chunk struct {
	// Offset of Data's first byte in the stream: the offset asked for,
	// or later when what was asked was acknowledged before (and dropped).
	Offset uint64
	Data   []byte
	// EOF: the stream has ended and Data reaches its end.
	EOF bool
}

// Read acknowledges every byte before offset and returns what follows it,
// at most max bytes (DefaultMaxRead if max is 0, never more than MaxRead).
// When nothing follows yet it waits, up to wait (DefaultWait if 0) or
// until ctx is done, for output or the end of the stream; an empty Chunk
// without EOF means nothing came. An offset beyond what the stream
// produced is an error (errdefs.ErrOutOfRange) and acknowledges nothing.
func (b *Buffer) Read(ctx context.Context, offset uint64, max int, wait time.Duration) (Chunk, error) {
	if max <= 0 {
		max = DefaultMaxRead
	}
	max = min(max, MaxRead)
	if wait <= 0 {
		wait = DefaultWait
	}
	var timer <-chan time.Time
	for {
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			return Chunk{}, ErrClosed
		}
		end := b.base + uint64(b.pending())
		if offset > end {
			b.mu.Unlock()
			return Chunk{}, fmt.Errorf("offset %d is beyond the %d bytes the stream produced: %w", offset, end, errdefs.ErrOutOfRange)
		}
		b.ack(offset)
		if offset < b.base {
			offset = b.base
		}
		if n := b.pending(); n > 0 || b.eof {
			n = min(n, max)
			c := Chunk{Offset: offset, Data: append([]byte(nil), b.data[b.start:b.start+n]...)}
			c.EOF = b.eof && n == b.pending()
			b.mu.Unlock()
			return c, nil
		}
		ch := b.changed
		b.mu.Unlock()

		if timer == nil {
			t := time.NewTimer(wait)
			defer t.Stop()
			timer = t.C
		}
		select {
		case <-ch:
		case <-timer:
			return Chunk{Offset: offset}, nil
		case <-ctx.Done():
			return Chunk{}, ctx.Err()
		}
	}
}

// ack drops the bytes before offset (at most what is held); b.mu must be
// held.
func (b *Buffer) ack(offset uint64) {
	if offset <= b.base {
		return
	}
	n := int(offset - b.base)
	b.start += n
	b.base = offset
	switch {
	case b.start == len(b.data):
		// Everything is acknowledged: an idle stream holds no memory.
		b.data, b.start = nil, 0
	case b.start > len(b.data)/2:
		b.data = append(b.data[:0:0], b.data[b.start:]...)
		b.start = 0
	}
	b.broadcast() // room for Fill
}

// Stats describes a Buffer for logs and tests.
type Stats struct {
	// Acked is the offset below which everything was acknowledged;
	// Pending the bytes held after it.
	Acked   uint64
	Pending int
	EOF     bool
	Err     error
}

// Stats returns the buffer's state.
func (b *Buffer) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	return Stats{Acked: b.base, Pending: b.pending(), EOF: b.eof, Err: b.srcErr}
}

// WaitPending blocks until the buffer holds at least n unacknowledged
// bytes, or its stream ended, or ctx is done (for tests and callers that
// wait for output without consuming it).
func (b *Buffer) WaitPending(ctx context.Context, n int) error {
	for {
		b.mu.Lock()
		if b.pending() >= n || b.eof || b.closed {
			b.mu.Unlock()
			return nil
		}
		ch := b.changed
		b.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
