package main

import (
	"context"
	"sort"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/utils/ptr"
)

// podRecord is what the worker knows of one pod on the node.
type podRecord struct {
	pod        *v1.Pod
	gone       bool // deleted from the API server
	prepared   *podStatus
	unprepared bool
}

// podWorker plays the kubelet's pod lifecycle as far as DRA goes: admitting a pod
// calls the DRA manager's PrepareResources (retried with backoff on failure, as the
// kubelet's pod sync does) and reads the CDI ids each container would get; a pod that
// terminates has its claims unprepared and, when deleted gracefully, is then removed
// from the API server the way the kubelet's status manager does.
type podWorker struct {
	dra      *dra.Manager
	client   kubernetes.Interface
	recorder record.EventRecorder
	status   *statusDir
	queue    workqueue.TypedRateLimitingInterface[types.UID]

	mu   sync.Mutex
	pods map[types.UID]*podRecord
}

func newPodWorker(draManager *dra.Manager, client kubernetes.Interface, recorder record.EventRecorder, status *statusDir) *podWorker {
	limiter := workqueue.NewTypedItemExponentialFailureRateLimiter[types.UID](500*time.Millisecond, 10*time.Second)
	return &podWorker{
		dra: draManager, client: client, recorder: recorder, status: status,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(limiter,
			workqueue.TypedRateLimitingQueueConfig[types.UID]{Name: "pods"}),
		pods: map[types.UID]*podRecord{},
	}
}

func (w *podWorker) observe(obj any, gone bool) {
	if tombstone, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
		obj = tombstone.Obj
	}
	pod, ok := obj.(*v1.Pod)
	if !ok {
		return
	}
	w.mu.Lock()
	rec := w.pods[pod.UID]
	if rec == nil {
		rec = &podRecord{}
		w.pods[pod.UID] = rec
	}
	rec.pod = pod
	rec.gone = rec.gone || gone
	w.mu.Unlock()
	w.queue.Add(pod.UID)
}

// activePods is the DRA manager's view of pods still running here; its reconcile loop
// unprepares the claims of any other pod it still holds.
func (w *podWorker) activePods() []*v1.Pod {
	w.mu.Lock()
	defer w.mu.Unlock()
	var active []*v1.Pod
	for _, rec := range w.pods {
		if !rec.gone && !rec.unprepared {
			active = append(active, rec.pod)
		}
	}
	return active
}

func (w *podWorker) run(ctx context.Context, workers int) {
	defer w.queue.ShutDown()
	for range workers {
		go wait.UntilWithContext(ctx, func(ctx context.Context) {
			for w.next(ctx) {
			}
		}, time.Second)
	}
	<-ctx.Done()
}

func (w *podWorker) next(ctx context.Context) bool {
	uid, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(uid)
	if err := w.sync(ctx, uid); err != nil {
		klog.FromContext(ctx).Info("Pod sync failed, will retry", "podUID", uid, "err", err)
		w.queue.AddRateLimited(uid)
		return true
	}
	w.queue.Forget(uid)
	return true
}

func (w *podWorker) sync(ctx context.Context, uid types.UID) error {
	w.mu.Lock()
	rec, found := w.pods[uid]
	var snapshot podRecord
	if found {
		snapshot = *rec
	}
	w.mu.Unlock()
	if !found {
		return nil
	}
	pod := snapshot.pod
	if !usesClaims(pod) {
		if snapshot.gone {
			w.forget(uid)
		}
		return nil
	}
	if snapshot.gone || pod.DeletionTimestamp != nil || terminal(pod) {
		return w.terminate(ctx, &snapshot)
	}
	if snapshot.prepared != nil {
		return nil
	}
	return w.admit(ctx, pod)
}

func usesClaims(pod *v1.Pod) bool {
	return len(pod.Spec.ResourceClaims) > 0 || pod.Status.ExtendedResourceClaimStatus != nil
}

func terminal(pod *v1.Pod) bool {
	return pod.Status.Phase == v1.PodSucceeded || pod.Status.Phase == v1.PodFailed
}

func baseStatus(pod *v1.Pod, state string, err error) podStatus {
	return podStatus{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID),
		State: state, Error: errorText(err)}
}

func (w *podWorker) admit(ctx context.Context, pod *v1.Pod) error {
	if err := w.dra.PrepareResources(ctx, pod); err != nil {
		w.recorder.Eventf(pod, v1.EventTypeWarning, "FailedPrepareDynamicResources", "%v", err)
		w.status.pod(baseStatus(pod, statePrepareFailed, err))
		w.status.grpcCalls()
		return err
	}
	status := baseStatus(pod, statePrepared, nil)
	status.Containers = map[string][]string{}
	claims := map[string]claimStatus{}
	containers := append(append([]v1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...)
	for i := range containers {
		container := &containers[i]
		info, err := w.dra.GetResources(pod, container)
		if err != nil {
			return err
		}
		ids := []string{}
		for _, device := range info.CDIDevices {
			ids = append(ids, device.Name)
		}
		status.Containers[container.Name] = ids
		infos, err := w.dra.GetContainerClaimInfos(pod, container)
		if err != nil {
			return err
		}
		for _, info := range infos {
			claims[string(info.ClaimUID)] = claimFromInfo(info)
		}
	}
	for _, claim := range claims {
		status.Claims = append(status.Claims, claim)
	}
	sort.Slice(status.Claims, func(i, j int) bool { return status.Claims[i].Name < status.Claims[j].Name })
	w.status.pod(status)
	w.status.grpcCalls()
	w.mu.Lock()
	if rec := w.pods[pod.UID]; rec != nil {
		rec.prepared = &status
	}
	w.mu.Unlock()
	return nil
}

func claimFromInfo(info *dra.ClaimInfo) claimStatus {
	claim := claimStatus{Namespace: info.Namespace, Name: info.ClaimName, UID: string(info.ClaimUID),
		Drivers: map[string][]deviceStatus{}}
	for driver, state := range info.DriverState {
		devices := []deviceStatus{}
		for _, d := range state.Devices {
			devices = append(devices, deviceStatus{Pool: d.PoolName, Device: d.DeviceName,
				Requests: d.RequestNames, CDIDeviceIDs: d.CDIDeviceIDs,
				ShareID: string(ptr.Deref(d.ShareID, ""))})
		}
		claim.Drivers[driver] = devices
	}
	return claim
}

func (w *podWorker) terminate(ctx context.Context, rec *podRecord) error {
	pod := rec.pod
	if !rec.unprepared {
		if err := w.dra.UnprepareResources(ctx, pod); err != nil {
			w.recorder.Eventf(pod, v1.EventTypeWarning, "FailedUnprepareDynamicResources", "%v", err)
			w.status.pod(baseStatus(pod, stateUnprepareFailed, err))
			w.status.grpcCalls()
			return err
		}
		status := baseStatus(pod, stateUnprepared, nil)
		if rec.prepared != nil {
			status.Containers, status.Claims = rec.prepared.Containers, rec.prepared.Claims
		}
		w.status.pod(status)
		w.status.grpcCalls()
		w.mu.Lock()
		if live := w.pods[pod.UID]; live != nil {
			live.unprepared = true
		}
		w.mu.Unlock()
	}
	if rec.gone {
		w.forget(pod.UID)
		return nil
	}
	if pod.DeletionTimestamp == nil {
		return nil
	}
	// Containers are gone and resources released: finish the graceful deletion.
	err := w.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

func (w *podWorker) forget(uid types.UID) {
	w.mu.Lock()
	delete(w.pods, uid)
	w.mu.Unlock()
}
