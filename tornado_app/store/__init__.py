"""Persistence: the Store (store.py) and what it is built from.

Only this package (and analytics/, and migrations/) speaks SQL. The rest of
the service calls Store methods and catches the Store's exceptions.
"""

from .executor import Conflict, StoreError, StoreUnavailable
from .models import Conversation, Message, RateLimit, User
from .store import Admission, QuotaRequest, Store

__all__ = ["Admission", "Conflict", "QuotaRequest", "Conversation", "Message", "RateLimit", "Store",
           "StoreError", "StoreUnavailable", "User"]
