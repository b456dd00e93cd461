package main

import (
	"context"
	"fmt"
	"os"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
)

// standin wires the kubelet's components the way the kubelet does (kubelet.go and the
// container manager): DRA manager started first, its registration handler added to
// the plugin manager for type DRAPlugin, pods admitted through the DRA manager.
type standin struct {
	client      kubernetes.Interface
	opts        options
	status      *statusDir
	draManager  *dra.Manager
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
}

func newStandin(ctx context.Context, client kubernetes.Interface, opts options, status *statusDir) (*standin, error) {
	draManager, err := dra.NewManager(klog.FromContext(ctx), client, opts.stateDir)
	if err != nil {
		return nil, fmt.Errorf("DRA manager: %w", err)
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	recorder := broadcaster.NewRecorder(scheme.Scheme, v1.EventSource{Component: "kubelet", Host: opts.nodeName})
	return &standin{client: client, opts: opts, status: status, draManager: draManager,
		broadcaster: broadcaster, recorder: recorder}, nil
}

func (s *standin) stop() {
	s.draManager.Stop()
	s.broadcaster.Shutdown()
}

// run returns when ctx is done.
func (s *standin) run(ctx context.Context) error {
	factory := informers.NewSharedInformerFactoryWithOptions(s.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", s.opts.nodeName).String()
		}))
	podInformer := factory.Core().V1().Pods().Informer()
	worker := newPodWorker(s.draManager, s.client, s.recorder, s.status)
	if _, err := podInformer.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { worker.observe(obj, false) },
		UpdateFunc: func(_, obj any) { worker.observe(obj, false) },
		DeleteFunc: func(obj any) { worker.observe(obj, true) },
	}); err != nil {
		return err
	}
	sourcesReady := config.NewSourcesReady(func(sets.Set[string]) bool { return podInformer.HasSynced() })
	getNode := func(ctx context.Context) (*v1.Node, error) {
		return s.client.CoreV1().Nodes().Get(ctx, s.opts.nodeName, metav1.GetOptions{})
	}
	if err := s.draManager.Start(ctx, worker.activePods, getNode, sourcesReady); err != nil {
		return fmt.Errorf("start DRA manager: %w", err)
	}
	handler := newRegistrationHandler(s.draManager.GetWatcherHandler(), knownServices[s.opts.draAPI],
		s.status, s.opts.driverName, newHealthCache(ctx, s.status))
	plugins := pluginmanager.NewPluginManager(s.opts.registryDir, s.recorder)
	plugins.AddHandler(registerapi.DRAPlugin, handler)
	go plugins.Run(ctx, sourcesReady, ctx.Done())

	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !toolscache.WaitForCacheSync(ctx.Done(), podInformer.HasSynced) {
		return ctx.Err()
	}
	s.status.standin(standinInfo{PID: os.Getpid(), Node: s.opts.nodeName, DRAAPI: s.opts.draAPI,
		RegistryDir: s.opts.registryDir, StateDir: s.opts.stateDir})
	klog.InfoS("Kubelet stand-in running", "node", s.opts.nodeName, "draAPI", s.opts.draAPI,
		"registryDir", s.opts.registryDir)

	// A kubelet admits pods whether or not their driver is there yet (and retries);
	// waiting for it only spares the log a burst of "not registered" retries.
	select {
	case <-handler.registered:
	case <-ctx.Done():
		return nil
	}
	worker.run(ctx, s.opts.workers)
	return nil
}
