package wasmhost

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"runtime/debug"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	godigest "github.com/opencontainers/go-digest"
	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
)

// engine compiles modules once per node and shares the compiled code among
// every instance of them.
type engine struct {
	rt wazero.Runtime
	// keepUnused compiled modules stay in memory when no instance uses them,
	// so that the next pod of the same image starts warm.
	keepUnused int

	mu      sync.Mutex
	modules map[string]*compiled // by digest
	unused  *list.List           // of *compiled, least recently used first
}

// compiled is a compiled module and how many instances use it.
type compiled struct {
	digest   string
	cm       wazero.CompiledModule
	refs     int
	elem     *list.Element // in engine.unused while refs == 0
	ready    chan struct{} // closed once cm or err is set
	err      error
	imports  []string
	hasStart bool
}

// newEngine returns an engine that caches compiled code in cacheDir ("":
// memory only) across host restarts.
func newEngine(ctx context.Context, cacheDir string, keepUnused int) (*engine, error) {
	cfg := wazero.NewRuntimeConfigCompiler().
		// Loops and calls check whether the module was closed, so that a
		// runaway module can be stopped, and yield to the Go scheduler.
		WithCloseOnContextDone(true)
	if cacheDir != "" {
		cache, err := wazero.NewCompilationCacheWithDir(cacheDir)
		if err != nil {
			return nil, fmt.Errorf("compilation cache %s: %w", cacheDir, err)
		}
		cfg = cfg.WithCompilationCache(cache)
	}
	rt := wazero.NewRuntimeWithConfig(ctx, cfg)
	if err := instantiateWASI(ctx, rt); err != nil {
		rt.Close(ctx)
		return nil, fmt.Errorf("instantiating WASI: %w", err)
	}
	return &engine{
		rt:         rt,
		keepUnused: keepUnused,
		modules:    map[string]*compiled{},
		unused:     list.New(),
	}, nil
}

// Digest returns the content digest of a module, as images name it.
func Digest(code []byte) string {
	sum := sha256.Sum256(code)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// hostModules are the import modules the host provides.
var hostModules = map[string]bool{wasi_snapshot_preview1.ModuleName: true}

// acquire returns the compiled module of digest, compiling what load
// returns when it is not in memory. Each acquire is paired with a release.
func (e *engine) acquire(ctx context.Context, digest string, load func() ([]byte, error)) (*compiled, error) {
	e.mu.Lock()
	c, ok := e.modules[digest]
	if ok {
		if c.elem != nil {
			e.unused.Remove(c.elem)
			c.elem = nil
		}
		c.refs++
		e.mu.Unlock()
		<-c.ready
		if c.err != nil {
			e.release(c)
			return nil, c.err
		}
		return c, nil
	}
	c = &compiled{digest: digest, refs: 1, ready: make(chan struct{})}
	e.modules[digest] = c
	e.mu.Unlock()

	c.cm, c.err = e.compile(ctx, digest, load)
	if c.err == nil {
		c.err = c.check()
	}
	close(c.ready)
	if c.err != nil {
		e.mu.Lock()
		delete(e.modules, digest)
		e.mu.Unlock()
		return nil, c.err
	}
	return c, nil
}

func (e *engine) compile(ctx context.Context, digest string, load func() ([]byte, error)) (wazero.CompiledModule, error) {
	code, err := load()
	if err != nil {
		return nil, err
	}
	if d, err := godigest.Parse(digest); err != nil || d.Algorithm().FromBytes(code) != d {
		return nil, fmt.Errorf("module content does not match digest %s: %w", digest, errdefs.ErrInvalidArgument)
	}
	// Compile on a thread of the host's: the caller may be a container's
	// thread, which no longer sees the compilation cache.
	var cm wazero.CompiledModule
	done := make(chan struct{})
	go func() {
		defer close(done)
		cm, err = e.rt.CompileModule(ctx, code)
	}()
	<-done
	if err != nil {
		return nil, fmt.Errorf("invalid WebAssembly module: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	log.G(ctx).WithField("digest", digest).WithField("size", len(code)).Debug("compiled module")
	return cm, nil
}

// check refuses modules the host cannot run: imports it does not provide,
// or no WASI command entry point.
func (c *compiled) check() error {
	var missing []string
	for _, f := range c.cm.ImportedFunctions() {
		mod, name, _ := f.Import()
		if !hostModules[mod] {
			missing = append(missing, mod+"."+name)
		}
	}
	for _, m := range c.cm.ImportedMemories() {
		mod, name, _ := m.Import()
		missing = append(missing, mod+"."+name+" (memory)")
	}
	if len(missing) > 0 {
		if len(missing) > 5 {
			missing = append(missing[:5], fmt.Sprintf("and %d more", len(missing)-5))
		}
		return fmt.Errorf("module imports what the host does not provide (only WASI preview 1 is): %s: %w",
			strings.Join(missing, ", "), errdefs.ErrInvalidArgument)
	}
	_, c.hasStart = c.cm.ExportedFunctions()["_start"]
	if !c.hasStart {
		return fmt.Errorf("module exports no _start function: not a WASI command module: %w", errdefs.ErrInvalidArgument)
	}
	return nil
}

// hold adds a reference to an acquired module.
func (e *engine) hold(c *compiled) {
	e.mu.Lock()
	c.refs++
	e.mu.Unlock()
}

// release drops a reference; unused modules beyond keepUnused are closed,
// least recently used first.
func (e *engine) release(c *compiled) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c.refs--
	if c.refs > 0 || c.err != nil {
		return
	}
	c.elem = e.unused.PushBack(c)
	closed := false
	for e.unused.Len() > e.keepUnused {
		old := e.unused.Remove(e.unused.Front()).(*compiled)
		old.elem = nil
		delete(e.modules, old.digest)
		if err := old.cm.Close(context.Background()); err != nil {
			log.L.WithError(err).Debug("closing compiled module")
		}
		closed = true
	}
	if closed {
		// Compiled code is large (several times the module): give the
		// memory back to the node now rather than whenever it is asked.
		go debug.FreeOSMemory()
	}
}

// count returns how many compiled modules are in memory.
func (e *engine) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.modules)
}

func (e *engine) close(ctx context.Context) error {
	return e.rt.Close(ctx)
}
