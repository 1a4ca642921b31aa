package stream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// filled returns a buffer of limit filled from src in the background, and
// a channel with Fill's result.
func filled(limit int, src io.Reader) (*Buffer, chan error) {
	b := New(limit)
	done := make(chan error, 1)
	go func() { done <- b.Fill(src) }()
	return b, done
}

func TestReadAcknowledges(t *testing.T) {
	ctx := context.Background()
	b, done := filled(0, strings.NewReader("hello, world"))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		offset uint64
		max    int
		want   Chunk
		acked  uint64
	}{
		{0, 5, Chunk{Offset: 0, Data: []byte("hello")}, 0},
		// The same offset again: nothing was acknowledged, the same bytes.
		{0, 5, Chunk{Offset: 0, Data: []byte("hello")}, 0},
		{5, 2, Chunk{Offset: 5, Data: []byte(", ")}, 5},
		// The rest: it reaches the end of an ended stream.
		{7, 0, Chunk{Offset: 7, Data: []byte("world"), EOF: true}, 7},
		// Everything acknowledged: only the end.
		{12, 0, Chunk{Offset: 12, EOF: true}, 12},
		// An offset acknowledged before: what is left, from where it is.
		{3, 0, Chunk{Offset: 12, EOF: true}, 12},
	} {
		got, err := b.Read(ctx, step.offset, step.max, 0)
		if err != nil {
			t.Fatalf("Read(%d): %v", step.offset, err)
		}
		if got.Offset != step.want.Offset || !bytes.Equal(got.Data, step.want.Data) || got.EOF != step.want.EOF {
			t.Errorf("Read(%d, %d) = %+v (%q), want %+v (%q)", step.offset, step.max, got, got.Data, step.want, step.want.Data)
		}
		if st := b.Stats(); st.Acked != step.acked {
			t.Errorf("after Read(%d): acknowledged %d, want %d", step.offset, st.Acked, step.acked)
		}
	}
}

func TestReadErrors(t *testing.T) {
	ctx := context.Background()
	b, done := filled(0, strings.NewReader("abc"))
	<-done
	if _, err := b.Read(ctx, 4, 0, 0); !errdefs.IsOutOfRange(err) {
		t.Errorf("Read beyond the end: %v, want out of range", err)
	}
	if st := b.Stats(); st.Acked != 0 || st.Pending != 3 {
		t.Errorf("a refused Read acknowledged something: %+v", st)
	}
	b.Close()
	if _, err := b.Read(ctx, 0, 0, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("Read after Close: %v", err)
	}
}

// TestBackpressure: a writer with nobody reading fills the buffer up to its
// limit and then blocks; a reader that comes late gets every byte in order.
func TestBackpressure(t *testing.T) {
	const limit, total = 4096, 3*4096 + 123
	ctx := context.Background()
	pr, pw := io.Pipe()
	b, done := filled(limit, pr)
	want := make([]byte, total)
	for i := range want {
		want[i] = byte('a' + i%26)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := pw.Write(want) // io.Pipe: returns once everything was read
		pw.Close()
		wrote <- err
	}()
	if err := b.WaitPending(ctx, limit); err != nil {
		t.Fatal(err)
	}
	if st := b.Stats(); st.Pending != limit || st.EOF {
		t.Fatalf("full buffer: %+v", st)
	}
	select {
	case err := <-wrote:
		t.Fatalf("the writer finished (%v) while the buffer held only %d of %d bytes", err, limit, total)
	default:
	}

	// The late reader, in small reads.
	var got []byte
	var off uint64
	for {
		c, err := b.Read(ctx, off, 1000, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if c.Offset != off {
			t.Fatalf("offset %d, want %d: output lost", c.Offset, off)
		}
		if st := b.Stats(); st.Pending > limit {
			t.Fatalf("buffer over its limit: %+v", st)
		}
		got = append(got, c.Data...)
		off += uint64(len(c.Data))
		if c.EOF {
			break
		}
	}
	if !bytes.Equal(got, want) {
		t.Errorf("read %d bytes, want %d, equal: %v", len(got), len(want), bytes.Equal(got, want))
	}
	if err := <-wrote; err != nil {
		t.Error(err)
	}
	if err := <-done; err != nil {
		t.Errorf("Fill: %v", err)
	}
}

// TestReadWaits: a Read with nothing to return waits for output, for the
// end, for its wait, or for its context.
func TestReadWaits(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		act  func(pw *io.PipeWriter, b *Buffer, cancel context.CancelFunc)
		wait time.Duration
		want Chunk
		err  error
	}{
		{"output", func(pw *io.PipeWriter, _ *Buffer, _ context.CancelFunc) { pw.Write([]byte("x")) }, time.Hour, Chunk{Data: []byte("x")}, nil},
		{"end", func(pw *io.PipeWriter, _ *Buffer, _ context.CancelFunc) { pw.Close() }, time.Hour, Chunk{EOF: true}, nil},
		{"error", func(pw *io.PipeWriter, _ *Buffer, _ context.CancelFunc) { pw.CloseWithError(unix.EIO) }, time.Hour, Chunk{EOF: true}, nil},
		{"end without source", func(_ *io.PipeWriter, b *Buffer, _ context.CancelFunc) { b.End() }, time.Hour, Chunk{EOF: true}, nil},
		{"nothing", func(*io.PipeWriter, *Buffer, context.CancelFunc) {}, time.Millisecond, Chunk{}, nil},
		{"canceled", func(_ *io.PipeWriter, _ *Buffer, cancel context.CancelFunc) { cancel() }, time.Hour, Chunk{}, context.Canceled},
		{"closed", func(_ *io.PipeWriter, b *Buffer, _ context.CancelFunc) { b.Close() }, time.Hour, Chunk{}, ErrClosed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pr, pw := io.Pipe()
			defer pw.Close()
			b := New(0)
			if tc.name != "end without source" {
				go b.Fill(pr)
			}
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			go tc.act(pw, b, cancel)
			got, err := b.Read(ctx, 0, 0, tc.wait)
			if !errors.Is(err, tc.err) {
				t.Fatalf("Read: %v, want %v", err, tc.err)
			}
			if got.Offset != tc.want.Offset || !bytes.Equal(got.Data, tc.want.Data) || got.EOF != tc.want.EOF {
				t.Errorf("Read = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestSourceError: a terminal's EIO ends the stream like EOF, after every
// byte written before it; the error is kept.
func TestSourceError(t *testing.T) {
	ctx := context.Background()
	pr, pw := io.Pipe()
	b, done := filled(0, pr)
	go func() {
		pw.Write([]byte("last words"))
		pw.CloseWithError(unix.EIO)
	}()
	if err := <-done; !errors.Is(err, unix.EIO) {
		t.Errorf("Fill: %v", err)
	}
	c, err := b.Read(ctx, 0, 0, 0)
	if err != nil || string(c.Data) != "last words" || !c.EOF {
		t.Errorf("Read = %+v (%q), %v", c, c.Data, err)
	}
	if st := b.Stats(); !errors.Is(st.Err, unix.EIO) {
		t.Errorf("stats: %+v", st)
	}
}

// TestCloseStopsFill: Close releases a Fill blocked on a full buffer and
// drops what was held.
func TestCloseStopsFill(t *testing.T) {
	ctx := context.Background()
	b, done := filled(10, strings.NewReader(strings.Repeat("z", 100)))
	if err := b.WaitPending(ctx, 10); err != nil {
		t.Fatal(err)
	}
	b.Close()
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("Fill after Close: %v", err)
	}
	if st := b.Stats(); st.Pending != 0 {
		t.Errorf("closed buffer holds %d bytes", st.Pending)
	}
}

// TestAckReleasesMemory: once everything is acknowledged nothing is held,
// and partial acknowledgements keep the rest intact.
func TestAckReleasesMemory(t *testing.T) {
	ctx := context.Background()
	data := bytes.Repeat([]byte("0123456789"), 1000)
	// A full buffer: Fill learns the end of its source only once there is
	// room again.
	b, done := filled(len(data), bytes.NewReader(data))
	if err := b.WaitPending(ctx, len(data)); err != nil {
		t.Fatal(err)
	}
	for off := uint64(0); off < uint64(len(data)); off += 777 {
		c, err := b.Read(ctx, off, 1, 0)
		if err != nil || len(c.Data) != 1 || c.Data[0] != data[off] {
			t.Fatalf("Read(%d) = %+v, %v", off, c, err)
		}
	}
	if c, err := b.Read(ctx, uint64(len(data)), 0, 0); err != nil || !c.EOF {
		t.Fatalf("Read at the end: %+v, %v", c, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	held := cap(b.data)
	b.mu.Unlock()
	if held != 0 {
		t.Errorf("an acknowledged stream holds %d bytes", held)
	}
}
