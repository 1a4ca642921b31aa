package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// A VM's processes write into the guest, not into containerd's FIFOs: the
// daemon copies. For each stream of a process a pump asks the agent for
// output (ReadStdio, from the offset copied so far: asking acknowledges
// what came before, so the agent keeps whatever the daemon has not copied,
// across a daemon restart) and writes it to the FIFO; another copies the
// FIFO of its stdin to the agent. The daemon holds a writer of that FIFO
// itself, so that its own restart (or CRI's) is no end of input: only
// CloseIO is.

// stdinDrain bounds the wait, at CloseIO, for what the stdin FIFO still
// holds to reach the guest.
const stdinDrain = 2 * time.Second

// streams are the pumps of one process.
type streams struct {
	proc   *agentapi.ProcessStdio
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// outDone is closed once every output stream reached its end; inDone
	// once the stdin pump has.
	outDone chan struct{}
	inDone  chan struct{}
	// inCancel ends the stdin pump's calls to the guest.
	inCancel context.CancelFunc

	mu      sync.Mutex
	stdin   io.Closer // the FIFO the stdin pump reads
	keep    *os.File  // our writer of it
	stdinUp bool      // the stdin pump runs
}

// startStreams starts the pumps of p's streams. resumed says the daemon
// restarted since the process started: the guest has kept, from what the
// process wrote, what the last daemon did not copy, and the pumps start
// there.
func startStreams(g *guestConn, p *task.Process, resumed bool) (*streams, error) {
	ctx, cancel := context.WithCancel(context.Background())
	s := &streams{
		proc:    &agentapi.ProcessStdio{ContainerId: p.Container.ID, ExecId: p.ExecID},
		cancel:  cancel,
		outDone: make(chan struct{}),
	}
	io := p.IO
	var outs []func()
	for _, o := range []struct {
		path   string
		stream agentapi.Stream
	}{{io.Stdout, agentapi.Stream_STDOUT}, {io.Stderr, agentapi.Stream_STDERR}} {
		if o.path == "" || (o.stream == agentapi.Stream_STDERR && io.Terminal) {
			continue
		}
		w, err := openOutput(ctx, o.path)
		if err != nil {
			cancel()
			return nil, err
		}
		stream := o.stream
		outs = append(outs, func() { s.copyOut(ctx, g, stream, w, resumed) })
	}
	s.wg.Add(len(outs))
	var outWG sync.WaitGroup
	outWG.Add(len(outs))
	for _, run := range outs {
		go func() {
			defer s.wg.Done()
			defer outWG.Done()
			run()
		}()
	}
	go func() { outWG.Wait(); close(s.outDone) }()
	if io.Stdin != "" {
		in, err := fifo.OpenFifo(ctx, io.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			s.stop()
			return nil, fmt.Errorf("opening stdin: %w", err)
		}
		keep, err := os.OpenFile(io.Stdin, os.O_RDWR, 0)
		if err != nil {
			in.Close()
			s.stop()
			return nil, fmt.Errorf("opening stdin for keep-alive: %w", err)
		}
		s.stdin, s.keep, s.stdinUp = in, keep, true
		s.inDone = make(chan struct{})
		inCtx, inCancel := context.WithCancel(ctx)
		s.inCancel = inCancel
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer close(s.inDone)
			defer inCancel()
			s.copyIn(inCtx, g, in)
		}()
	}
	return s, nil
}

// copyOut copies one output stream until its end (or stop). The writer
// comes once a reader is there (see openOutput).
func (s *streams) copyOut(ctx context.Context, g *guestConn, stream agentapi.Stream, open func() (io.WriteCloser, error), resumed bool) {
	w, err := open()
	if err != nil {
		if ctx.Err() == nil {
			log.G(ctx).WithError(err).WithField("container", s.proc.ContainerId).Warn("opening where a container's output goes")
		}
		return
	}
	defer w.Close()
	var offset uint64
	for ctx.Err() == nil {
		var r *agentapi.ReadStdioResponse
		err := g.call(ctx, true, func(ctx context.Context, ss *session) error {
			var err error
			r, err = ss.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{Process: s.proc, Stream: stream, Offset: offset})
			return err
		})
		switch {
		case err == nil:
		case ctx.Err() != nil, errors.Is(err, errVMGone), errdefs.IsNotFound(err):
			return
		default:
			log.G(ctx).WithError(err).WithField("container", s.proc.ContainerId).WithField("exec", s.proc.ExecId).Debug("reading a stream of the guest; retrying")
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		if r.GetOffset() > offset && !resumed {
			log.G(ctx).WithField("container", s.proc.ContainerId).WithField("lost", r.GetOffset()-offset).Warn("output of the guest was lost")
		}
		if len(r.GetData()) > 0 {
			if _, err := w.Write(r.GetData()); err != nil {
				log.G(ctx).WithError(err).WithField("container", s.proc.ContainerId).Warn("writing a container's output")
			}
		}
		offset = r.GetOffset() + uint64(len(r.GetData()))
		resumed = false
		if r.GetEof() {
			// Acknowledge the end, so the agent can free the stream.
			_ = g.call(ctx, true, func(ctx context.Context, ss *session) error {
				_, err := ss.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{Process: s.proc, Stream: stream, Offset: offset, WaitMs: 1})
				return err
			})
			return
		}
	}
}

// copyIn copies the stdin FIFO to the guest until stop.
func (s *streams) copyIn(ctx context.Context, g *guestConn, in io.Reader) {
	buf := make([]byte, 32<<10)
	for ctx.Err() == nil {
		n, err := in.Read(buf)
		if n > 0 {
			data := append([]byte(nil), buf[:n]...)
			if werr := g.call(ctx, false, func(ctx context.Context, ss *session) error {
				_, err := ss.agent.WriteStdin(ctx, &agentapi.WriteStdinRequest{Process: s.proc, Data: data})
				return err
			}); werr != nil && ctx.Err() == nil {
				log.G(ctx).WithError(werr).WithField("container", s.proc.ContainerId).Debug("writing to a process's stdin in the guest")
				if errors.Is(werr, errVMGone) || errdefs.IsNotFound(werr) {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

// waitOutput waits, at most d, for the output streams to end.
func (s *streams) waitOutput(d time.Duration) {
	select {
	case <-s.outDone:
	case <-time.After(d):
	}
}

// closeStdin ends the process's input: what the FIFO still holds is
// copied to the guest first (the client's writer is closed by then), then
// the guest closes the process's stdin.
func (s *streams) closeStdin(ctx context.Context, g *guestConn) error {
	s.mu.Lock()
	in, keep, up := s.stdin, s.keep, s.stdinUp
	s.stdin, s.keep, s.stdinUp = nil, nil, false
	s.mu.Unlock()
	if !up {
		return nil
	}
	keep.Close()
	select {
	case <-s.inDone:
	case <-time.After(stdinDrain):
		// A writer is still open: input ends here all the same.
	}
	in.Close()
	select {
	case <-s.inDone:
	case <-ctx.Done():
	case <-time.After(stdinDrain):
	}
	// A write the guest does not answer ends here: CloseIO must not hang
	// on it.
	s.inCancel()
	return g.call(ctx, true, func(ctx context.Context, ss *session) error {
		_, err := ss.agent.CloseStdin(ctx, s.proc)
		return err
	})
}

// stop ends every pump and closes what they hold.
func (s *streams) stop() {
	s.cancel()
	s.mu.Lock()
	in, keep := s.stdin, s.keep
	s.stdin, s.keep, s.stdinUp = nil, nil, false
	s.mu.Unlock()
	if keep != nil {
		keep.Close()
	}
	if in != nil {
		in.Close()
	}
	s.wg.Wait()
}

// openOutput opens where a process's output goes: a FIFO or a file://
// URI. The FIFO is opened for writing once it has a reader: after a daemon
// restart the pumps start before CRI reopens its readers, and what is
// written to a FIFO nobody holds open for reading is gone when the writer
// closes. The returned function opens it; it blocks until a reader comes
// or ctx ends.
func openOutput(ctx context.Context, p string) (func() (io.WriteCloser, error), error) {
	if strings.HasPrefix(p, "file://") {
		f, err := os.OpenFile(strings.TrimPrefix(p, "file://"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return nil, err
		}
		return func() (io.WriteCloser, error) { return f, nil }, nil
	}
	if strings.Contains(p, "://") {
		return nil, fmt.Errorf("log URI %q is not supported by %s: %w", p, ID, errdefs.ErrNotImplemented)
	}
	st, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("opening output %s: %w", p, err)
	}
	if st.Mode()&os.ModeNamedPipe == 0 {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return nil, err
		}
		return func() (io.WriteCloser, error) { return f, nil }, nil
	}
	return func() (io.WriteCloser, error) {
		w, err := fifo.OpenFifo(ctx, p, syscall.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("opening output %s: %w", p, err)
		}
		return w, nil
	}, nil
}
